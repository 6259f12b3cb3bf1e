# The Dataproc cluster of the PySpark streaming job (analytics/spark/job.py, submitted by
# analytics/spark/submit-dataproc.sh): internal IPs only, Shielded VMs, disks encrypted with
# the data key, running as the Dataproc service account, staging/temp in our own bucket.
# With dataproc_enabled = false, run the job as serverless batches on the same subnet and
# service account instead (docs/deploy.md).

resource "google_dataproc_cluster" "analytics" {
  count                         = var.dataproc_enabled ? 1 : 0
  name                          = "${var.name_prefix}-analytics"
  region                        = var.region
  graceful_decommission_timeout = "120s"

  cluster_config {
    staging_bucket = google_storage_bucket.dataproc.name
    temp_bucket    = google_storage_bucket.dataproc.name

    gce_cluster_config {
      subnetwork             = google_compute_subnetwork.analytics.id
      internal_ip_only       = true
      service_account        = google_service_account.dataproc.email
      service_account_scopes = ["cloud-platform"]
      tags                   = ["dataproc"]

      shielded_instance_config {
        enable_secure_boot          = true
        enable_vtpm                 = true
        enable_integrity_monitoring = true
      }
    }

    master_config {
      num_instances = 1
      machine_type  = var.dataproc_master_machine_type
      disk_config {
        boot_disk_type    = "pd-balanced"
        boot_disk_size_gb = 100
      }
    }

    worker_config {
      num_instances = var.dataproc_workers
      machine_type  = var.dataproc_worker_machine_type
      disk_config {
        boot_disk_type    = "pd-balanced"
        boot_disk_size_gb = 100
      }
    }

    software_config {
      image_version = var.dataproc_image_version
      override_properties = {
        "dataproc:dataproc.logging.stackdriver.job.driver.enable" = "true"
        "spark:spark.sql.session.timeZone"                        = "UTC"
      }
    }

    encryption_config {
      kms_key_name = google_kms_crypto_key.data.id
    }

    endpoint_config {
      enable_http_port_access = false
    }
  }

  depends_on = [
    google_project_iam_member.dataproc_worker,
    google_storage_bucket_iam_member.staging_dataproc,
    google_storage_bucket_iam_member.staging_dataproc_reader,
    google_compute_firewall.dataproc_internal,
    google_compute_router_nat.analytics,
  ]
}
