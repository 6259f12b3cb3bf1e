#!/usr/bin/env bash
# Submits the analytics job (job.py) to Dataproc: to a cluster (`gcloud dataproc jobs submit
# pyspark`, restartable) or serverless (`gcloud dataproc batches submit pyspark`). Reads the
# `orders` topic, writes windows to the `analytics-results` topic and to
# gs://BUCKET/analytics/windows, checkpoints to gs://BUCKET/analytics/checkpoint.
#
#   analytics/spark/submit-dataproc.sh cluster    --bucket BUCKET [--cluster NAME] [-- JOB_ARGS...]
#   analytics/spark/submit-dataproc.sh serverless --bucket BUCKET [-- JOB_ARGS...]
#
# Options (each also from the environment):
#   --bucket B        ANALYTICS_BUCKET     GCS bucket for output, checkpoint, staging (required)
#   --project P       GCP_PROJECT          default: gcloud's configured project
#   --region R        DATAPROC_REGION      default: asia-south1
#   --cluster C       DATAPROC_CLUSTER     cluster mode; default: mercato-analytics
#   --runtime V       DATAPROC_RUNTIME     serverless runtime; default: 2.2 (Spark 3.5, Scala 2.13)
#   --service-account SA DATAPROC_SERVICE_ACCOUNT  serverless: the identity the batch runs as
#   --subnet S        DATAPROC_SUBNET      serverless: subnetwork (needs Cloud NAT to fetch the Kafka package)
#   --dry-run         DRY_RUN=1            print the gcloud command instead of running it
# Kafka (the seed's names): KAFKA_BOOTSTRAP_SERVERS (required), KAFKA_SECURITY_PROTOCOL
# (SASL_SSL), KAFKA_SASL_MECHANISM (PLAIN). Credentials, in this order:
#   1. KAFKA_API_KEY and KAFKA_API_SECRET in this shell: handed to the driver's environment as
#      job properties (anyone who can view the job can read them; prefer 2);
#   2. otherwise Secret Manager: the job reads projects/PROJECT/secrets/$KAFKA_API_KEY_SECRET_ID
#      and .../$KAFKA_API_SECRET_SECRET_ID (defaults mercato-kafka-api-key and
#      mercato-kafka-api-secret) at start, as the job's service account (which needs
#      roles/secretmanager.secretAccessor on both); nothing secret is in the submission.
# SPARK_KAFKA_PACKAGE overrides the spark-sql-kafka coordinate (default: the Scala build of
# the target, version = pyspark's pin in requirements.txt, which matches Dataproc's Spark).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }
mode="${1:-}"
case "$mode" in cluster|serverless) shift ;; -h|--help) usage 0 ;; *) usage ;; esac

bucket="${ANALYTICS_BUCKET:-}"
project="${GCP_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
region="${DATAPROC_REGION:-asia-south1}"
cluster="${DATAPROC_CLUSTER:-mercato-analytics}"
runtime="${DATAPROC_RUNTIME:-2.2}"
service_account="${DATAPROC_SERVICE_ACCOUNT:-}"
subnet="${DATAPROC_SUBNET:-}"
dry_run="${DRY_RUN:-0}"
while [ $# -gt 0 ]; do
    case "$1" in
        --bucket) bucket="$2"; shift 2 ;;
        --project) project="$2"; shift 2 ;;
        --region) region="$2"; shift 2 ;;
        --cluster) cluster="$2"; shift 2 ;;
        --runtime) runtime="$2"; shift 2 ;;
        --service-account) service_account="$2"; shift 2 ;;
        --subnet) subnet="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        *) echo "submit-dataproc: unknown option $1" >&2; usage ;;
    esac
done
die() { echo "submit-dataproc: $*" >&2; exit 1; }
[ -n "$bucket" ] || die "--bucket (or ANALYTICS_BUCKET) is required: the bucket from deploy/terraform/gcp"
bucket="${bucket#gs://}"; bucket="${bucket%/}"
[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ] || die "KAFKA_BOOTSTRAP_SERVERS is required (host:port of the Kafka cluster)"
if [ -z "$project" ]; then
    if [ "$dry_run" = 1 ]; then project=PROJECT; else
        project="$(gcloud config get-value project 2>/dev/null || true)"
        [ -n "$project" ] || die "no project: --project, GCP_PROJECT or gcloud config set project"
    fi
fi
[ "$dry_run" = 1 ] || command -v gcloud >/dev/null 2>&1 || die "gcloud is required (https://cloud.google.com/sdk)"

spark_version="$(sed -n 's/^pyspark==//p' "$here/requirements.txt")"
if [ "$mode" = cluster ]; then
    scala="${DATAPROC_SCALA:-2.12}"       # Dataproc image 2.2 (and 2.1) is built with Scala 2.12
else
    case "$runtime" in 1.*) scala=2.12 ;; *) scala=2.13 ;; esac   # Serverless 2.x runtimes use Scala 2.13
fi
package="${SPARK_KAFKA_PACKAGE:-org.apache.spark:spark-sql-kafka-0-10_${scala}:${spark_version}}"

output="${ANALYTICS_OUTPUT:-gs://$bucket/analytics/windows}"
checkpoint="${ANALYTICS_CHECKPOINT:-gs://$bucket/analytics/checkpoint}"
job_args=(--source kafka --output "$output" --checkpoint "$checkpoint"
    --bootstrap-servers "$KAFKA_BOOTSTRAP_SERVERS"
    --security-protocol "${KAFKA_SECURITY_PROTOCOL:-SASL_SSL}" --sasl-mechanism "${KAFKA_SASL_MECHANISM:-PLAIN}"
    --topic "${KAFKA_ORDERS_TOPIC:-orders}" --results-topic "${KAFKA_RESULTS_TOPIC:-analytics-results}")
props=("spark.jars.packages=$package" "spark.sql.shuffle.partitions=${SHUFFLE_PARTITIONS:-8}"
    "spark.sql.streaming.stateStore.providerClass=org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider")
if [ -n "${KAFKA_API_KEY:-}" ] && [ -n "${KAFKA_API_SECRET:-}" ]; then
    echo "submit-dataproc: passing KAFKA_API_KEY/SECRET as job properties (visible to job viewers; Secret Manager avoids that)" >&2
    if [ "$mode" = cluster ]; then
        # The driver runs in YARN (cluster deploy mode) so that it gets this environment.
        props+=("spark.submit.deployMode=cluster"
            "spark.yarn.appMasterEnv.KAFKA_API_KEY=$KAFKA_API_KEY" "spark.yarn.appMasterEnv.KAFKA_API_SECRET=$KAFKA_API_SECRET")
    else
        props+=("spark.dataproc.driverEnv.KAFKA_API_KEY=$KAFKA_API_KEY" "spark.dataproc.driverEnv.KAFKA_API_SECRET=$KAFKA_API_SECRET")
    fi
else
    job_args+=(--kafka-api-key-secret "projects/$project/secrets/${KAFKA_API_KEY_SECRET_ID:-mercato-kafka-api-key}"
        --kafka-api-secret-secret "projects/$project/secrets/${KAFKA_API_SECRET_SECRET_ID:-mercato-kafka-api-secret}")
fi
# gcloud splits --properties on commas unless told another delimiter (^D^): use one that no
# value contains.
delimiter=""
for d in '#' '|' '~' '@' '!' ';' '%'; do
    case "${props[*]}" in *"$d"*) ;; *) delimiter="$d"; break ;; esac
done
[ -n "$delimiter" ] || die "every delimiter gcloud could use appears in a property value"
joined="^$delimiter^$(IFS="$delimiter"; echo "${props[*]}")"

if [ "$mode" = cluster ]; then
    cmd=(gcloud dataproc jobs submit pyspark "$here/job.py" --project "$project" --region "$region"
        --cluster "$cluster" --max-failures-per-hour 5 --labels app=mercato,component=analytics
        --properties "$joined")
else
    cmd=(gcloud dataproc batches submit pyspark "$here/job.py" --project "$project" --region "$region"
        --batch "mercato-analytics-$(date -u +%Y%m%d-%H%M%S)" --version "$runtime" --deps-bucket "gs://$bucket"
        --labels app=mercato,component=analytics --properties "$joined")
    [ -z "$service_account" ] || cmd+=(--service-account "$service_account")
    [ -z "$subnet" ] || cmd+=(--subnet "$subnet")
fi
cmd+=(-- "${job_args[@]}" "$@")

if [ "$dry_run" = 1 ]; then
    shown=()   # the same command with credentials masked
    for arg in "${cmd[@]}"; do
        [ "$arg" != "$joined" ] || arg="$(printf '%s' "$arg" | sed -E "s/(KAFKA_API_(KEY|SECRET)=)[^$delimiter]*/\\1***/g")"
        shown+=("$arg")
    done
    printf '%q ' "${shown[@]}"
    echo
else
    exec "${cmd[@]}"
fi
