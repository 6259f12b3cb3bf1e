# Cloud Run pulls from Artifact Registry: the same image as ECR, pushed here too
# (docs/deploy.md). Immutable tags, encrypted with the data key, old versions cleaned up.
resource "google_artifact_registry_repository" "mercato" {
  repository_id = var.name_prefix
  location      = var.region
  format        = "DOCKER"
  description   = "Mercato images (deploy/docker/Dockerfile)"
  kms_key_name  = google_kms_crypto_key.data.id

  docker_config {
    immutable_tags = true
  }

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 20
    }
  }
  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      older_than = "7776000s" # 90 days
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.agents]
}
