# Service accounts, each with the least it needs: project-level only what has no narrower
# scope (Dataproc's worker role), everything else on the bucket or secret itself.

# Runs the Dataproc nodes / serverless batches, i.e. the PySpark job.
resource "google_service_account" "dataproc" {
  account_id   = "${var.name_prefix}-dataproc"
  display_name = "Mercato Dataproc (PySpark analytics job)"
}

# The worker role: what a Dataproc VM needs to report to the control plane. No narrower scope exists.
resource "google_project_iam_member" "dataproc_worker" {
  project = var.project_id
  role    = "roles/dataproc.worker"
  member  = google_service_account.dataproc.member
}

# Runs the Rust analytics service on Cloud Run.
resource "google_service_account" "analytics" {
  account_id   = "${var.name_prefix}-analytics"
  display_name = "Mercato analytics service (Cloud Run)"
}

# Confluent Cloud API keys (deploy/terraform/confluent output client_credentials): the Spark
# job's (client "spark", read by analytics/spark/submit-dataproc.sh's job at start) and the
# Cloud Run analytics service's (client "analytics"). Terraform creates the secrets, not their
# values (docs/deploy.md):
#   printf %s "$KEY" | gcloud secrets versions add mercato-prod-kafka-api-key --data-file=-
locals {
  kafka_secrets = {
    "kafka-api-key"              = google_service_account.dataproc.member
    "kafka-api-secret"           = google_service_account.dataproc.member
    "analytics-kafka-api-key"    = google_service_account.analytics.member
    "analytics-kafka-api-secret" = google_service_account.analytics.member
  }
}

resource "google_secret_manager_secret" "kafka" {
  for_each  = local.kafka_secrets
  secret_id = "${var.name_prefix}-${each.key}"

  replication {
    user_managed {
      replicas {
        location = var.region
      }
    }
  }

  depends_on = [google_project_service.apis]
}

# Each secret readable by its one consumer only.
resource "google_secret_manager_secret_iam_member" "kafka" {
  for_each  = local.kafka_secrets
  secret_id = google_secret_manager_secret.kafka[each.key].id
  role      = "roles/secretmanager.secretAccessor"
  member    = each.value
}
