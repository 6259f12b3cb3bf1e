# Cloud Storage: analytics results (the Rust service's gs:// results URL and the Spark job's
# output), Spark checkpoints, Dataproc staging/temp, and the access logs of all three. Private
# (uniform access, public access prevention), versioned, encrypted with the data key.

resource "google_storage_bucket" "logs" {
  #checkov:skip=CKV_GCP_62:This is the access-log bucket; logging it into itself would log its own log deliveries in a loop.
  name                        = "${var.project_id}-${var.name_prefix}-logs"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }
  encryption {
    default_kms_key_name = google_kms_crypto_key.data.id
  }
  lifecycle_rule {
    condition {
      age = var.log_retention_days
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.agents]
}

# The analytics bucket (ANALYTICS_BUCKET of analytics/spark/submit-dataproc.sh): the Spark
# job's windows (analytics/windows/) and checkpoint (analytics/checkpoint/), serverless
# batches' dependencies, and the Rust service's results (results/).
resource "google_storage_bucket" "analytics" {
  name                        = "${var.project_id}-${var.name_prefix}-analytics"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }
  encryption {
    default_kms_key_name = google_kms_crypto_key.data.id
  }
  logging {
    log_bucket        = google_storage_bucket.logs.name
    log_object_prefix = "analytics/"
  }
  lifecycle_rule {
    condition {
      age            = var.results_retention_days
      matches_prefix = ["results/", "analytics/windows/"]
    }
    action {
      type = "Delete"
    }
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 30
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.agents]
}

# Dataproc's staging (job files, driver output) and temp (Spark history, YARN logs) buckets.
resource "google_storage_bucket" "dataproc" {
  name                        = "${var.project_id}-${var.name_prefix}-dataproc"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }
  encryption {
    default_kms_key_name = google_kms_crypto_key.data.id
  }
  logging {
    log_bucket        = google_storage_bucket.logs.name
    log_object_prefix = "dataproc/"
  }
  lifecycle_rule {
    condition {
      age = 90
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.agents]
}

# Bucket-level grants only: no project-wide storage role for anyone.
resource "google_storage_bucket_iam_member" "analytics_dataproc" {
  bucket = google_storage_bucket.analytics.name
  role   = "roles/storage.objectUser"
  member = google_service_account.dataproc.member
}

resource "google_storage_bucket_iam_member" "staging_dataproc" {
  bucket = google_storage_bucket.dataproc.name
  role   = "roles/storage.objectUser"
  member = google_service_account.dataproc.member
}

# Dataproc needs to read the staging bucket's metadata (storage.buckets.get) as well.
resource "google_storage_bucket_iam_member" "staging_dataproc_reader" {
  bucket = google_storage_bucket.dataproc.name
  role   = "roles/storage.legacyBucketReader"
  member = google_service_account.dataproc.member
}

resource "google_storage_bucket_iam_member" "analytics_run" {
  bucket = google_storage_bucket.analytics.name
  role   = "roles/storage.objectUser"
  member = google_service_account.analytics.member
}
