terraform {
  required_version = ">= 1.6"
  required_providers {
    confluent = {
      source  = "confluentinc/confluent"
      version = "~> 2.10"
    }
  }
}

# Credentials come from the environment, never from files in the repository:
#   export CONFLUENT_CLOUD_API_KEY=... CONFLUENT_CLOUD_API_SECRET=...   (a Cloud API key of an
#   OrganizationAdmin or EnvironmentAdmin user or service account)
provider "confluent" {}
