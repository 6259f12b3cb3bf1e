# Mercato's analytics on GCP (asia-south1): results and checkpoints in Cloud Storage, the
# PySpark job on Dataproc (a cluster, or serverless batches on the same subnet and service
# account), optionally the Rust analytics service on Cloud Run, each with its own service
# account holding only bucket- and secret-level grants. docs/deploy.md has the order.

data "google_project" "this" {
  project_id = var.project_id
}

data "google_storage_project_service_account" "gcs" {
  project = var.project_id
}

locals {
  services = toset([
    "artifactregistry.googleapis.com",
    "cloudkms.googleapis.com",
    "compute.googleapis.com",
    "dataproc.googleapis.com",
    "iam.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "storage.googleapis.com",
  ])
  # Google-managed service agents that encrypt with the key on our behalf.
  compute_agent  = "serviceAccount:service-${data.google_project.this.number}@compute-system.iam.gserviceaccount.com"
  dataproc_agent = "serviceAccount:service-${data.google_project.this.number}@dataproc-accounts.iam.gserviceaccount.com"
  registry_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-artifactregistry.iam.gserviceaccount.com"
  run_agent      = "serviceAccount:service-${data.google_project.this.number}@serverless-robot-prod.iam.gserviceaccount.com"
  gcs_agent      = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

resource "google_project_service" "apis" {
  for_each           = local.services
  project            = var.project_id
  service            = each.key
  disable_on_destroy = false
}

# One customer-managed key for the buckets, Dataproc disks, the image registry and Cloud Run.
resource "google_kms_key_ring" "mercato" {
  name     = var.name_prefix
  location = var.region

  depends_on = [google_project_service.apis]
}

resource "google_kms_crypto_key" "data" {
  name            = "${var.name_prefix}-data"
  key_ring        = google_kms_key_ring.mercato.id
  rotation_period = "7776000s" # 90 days
  purpose         = "ENCRYPT_DECRYPT"

  lifecycle {
    prevent_destroy = true
  }
}

resource "google_kms_crypto_key_iam_member" "agents" {
  for_each      = toset([local.compute_agent, local.dataproc_agent, local.registry_agent, local.run_agent, local.gcs_agent])
  crypto_key_id = google_kms_crypto_key.data.id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = each.key

  depends_on = [google_project_service.apis]
}
