# Outputs of the GCP root module: what the Spark submit script, the image push and operators need.

output "analytics_bucket" {
  description = "Bucket of the analytics: the Spark job's windows (analytics/windows/) and checkpoint (analytics/checkpoint/), the Rust service's results (results/)."
  value       = google_storage_bucket.analytics.name
}

output "results_url" {
  description = "Object-store URL of the Rust analytics service's results (MERCATO_ANALYTICS_ENGINE__RESULTS_URL)."
  value       = "gs://${google_storage_bucket.analytics.name}/results"
}

output "submit_env" {
  description = "Environment of analytics/spark/submit-dataproc.sh (eval \"$(terraform output -raw submit_env)\"); KAFKA_BOOTSTRAP_SERVERS included, the Kafka credentials stay in Secret Manager."
  value = join("\n", compact([
    "export GCP_PROJECT=${var.project_id}",
    "export DATAPROC_REGION=${var.region}",
    "export ANALYTICS_BUCKET=${google_storage_bucket.analytics.name}",
    var.dataproc_enabled ? "export DATAPROC_CLUSTER=${google_dataproc_cluster.analytics[0].name}" : "",
    "export DATAPROC_SERVICE_ACCOUNT=${google_service_account.dataproc.email}",
    "export DATAPROC_SUBNET=${google_compute_subnetwork.analytics.name}",
    "export KAFKA_BOOTSTRAP_SERVERS=${var.kafka_bootstrap_servers}",
    "export KAFKA_API_KEY_SECRET_ID=${google_secret_manager_secret.kafka["kafka-api-key"].secret_id}",
    "export KAFKA_API_SECRET_SECRET_ID=${google_secret_manager_secret.kafka["kafka-api-secret"].secret_id}",
    "",
  ]))
}

output "dataproc_bucket" {
  description = "Dataproc staging and temp bucket (job files, driver output, Spark history)."
  value       = google_storage_bucket.dataproc.name
}

output "dataproc_cluster" {
  description = "Name of the Dataproc cluster (gcloud dataproc jobs submit pyspark --cluster NAME --region REGION), or null when dataproc_enabled is false."
  value       = var.dataproc_enabled ? google_dataproc_cluster.analytics[0].name : null
}

output "dataproc_service_account" {
  description = "Service account of the Dataproc nodes, and of serverless batches (gcloud dataproc batches submit --service-account)."
  value       = google_service_account.dataproc.email
}

output "subnetwork" {
  description = "Subnet for serverless batches (gcloud dataproc batches submit --subnet): private, Private Google Access, NAT to Confluent Cloud."
  value       = google_compute_subnetwork.analytics.id
}

output "kafka_secret_ids" {
  description = "Secret Manager secrets to fill (gcloud secrets versions add): kafka-api-key/-secret with the Confluent client \"spark\", analytics-kafka-api-key/-secret with the client \"analytics\" (Cloud Run only)."
  value       = { for name, secret in google_secret_manager_secret.kafka : name => secret.secret_id }
}

output "artifact_registry" {
  description = "Docker repository for the Cloud Run image: docker push REPO/mercato:TAG."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.mercato.repository_id}"
}

output "analytics_service_url" {
  description = "URL of the Cloud Run analytics service (callers need roles/run.invoker and an ID token), or null when analytics_image is empty."
  value       = var.analytics_image == "" ? null : google_cloud_run_v2_service.analytics[0].uri
}

output "kms_key" {
  description = "The customer-managed key of the buckets, Dataproc disks, registry and Cloud Run."
  value       = google_kms_crypto_key.data.id
}
