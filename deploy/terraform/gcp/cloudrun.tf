# The Rust analytics service on Cloud Run (only when var.analytics_image is set): the orders
# topic from Confluent Cloud -> windows -> gs:// results and the analytics-results topic, its
# HTTP API for authenticated callers only. One always-on instance: it is a Kafka consumer
# (CPU always allocated) and keeps window state in memory until a window is final.
resource "google_cloud_run_v2_service" "analytics" {
  count               = var.analytics_image == "" ? 0 : 1
  name                = "${var.name_prefix}-analytics"
  location            = var.region
  ingress             = "INGRESS_TRAFFIC_ALL"
  deletion_protection = true

  template {
    service_account                  = google_service_account.analytics.email
    execution_environment            = "EXECUTION_ENVIRONMENT_GEN2"
    encryption_key                   = google_kms_crypto_key.data.id
    max_instance_request_concurrency = 80
    timeout                          = "300s"

    scaling {
      min_instance_count = 1
      max_instance_count = 1
    }

    containers {
      image = var.analytics_image
      args  = ["serve", "analytics"]

      ports {
        container_port = 8006
      }

      resources {
        limits = {
          cpu    = "1"
          memory = "512Mi"
        }
        cpu_idle          = false
        startup_cpu_boost = true
      }

      env {
        name  = "MERCATO_HOST"
        value = "0.0.0.0"
      }
      env {
        name  = "MERCATO_ANALYTICS__PORT"
        value = "8006"
      }
      env {
        name  = "MERCATO_DATA_DIR"
        value = "/var/lib/mercato"
      }
      env {
        name  = "MERCATO_ANALYTICS_ENGINE__RESULTS_URL"
        value = "gs://${google_storage_bucket.analytics.name}/results"
      }
      env {
        name  = "KAFKA_BOOTSTRAP_SERVERS"
        value = var.kafka_bootstrap_servers
      }
      env {
        name  = "KAFKA_SECURITY_PROTOCOL"
        value = "SASL_SSL"
      }
      env {
        name  = "KAFKA_SASL_MECHANISM"
        value = "PLAIN"
      }
      env {
        name = "KAFKA_API_KEY"
        value_source {
          secret_key_ref {
            secret  = google_secret_manager_secret.kafka["analytics-kafka-api-key"].secret_id
            version = "latest"
          }
        }
      }
      env {
        name = "KAFKA_API_SECRET"
        value_source {
          secret_key_ref {
            secret  = google_secret_manager_secret.kafka["analytics-kafka-api-secret"].secret_id
            version = "latest"
          }
        }
      }

      startup_probe {
        http_get {
          path = "/health"
          port = 8006
        }
        period_seconds    = 2
        failure_threshold = 30
      }
      liveness_probe {
        http_get {
          path = "/health"
          port = 8006
        }
        period_seconds    = 10
        failure_threshold = 3
      }
    }
  }

  depends_on = [
    google_secret_manager_secret_iam_member.kafka,
    google_storage_bucket_iam_member.analytics_run,
    google_kms_crypto_key_iam_member.agents,
  ]
}

# Callers of the analytics API: named principals only, never allUsers / allAuthenticatedUsers.
resource "google_cloud_run_v2_service_iam_member" "analytics_invokers" {
  for_each = var.analytics_image == "" ? toset([]) : toset(var.analytics_invokers)
  name     = google_cloud_run_v2_service.analytics[0].name
  location = var.region
  role     = "roles/run.invoker"
  member   = each.key
}
