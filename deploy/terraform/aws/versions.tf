terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.100: the Cognito app client's refresh_token_rotation and the user pool's
      # user_pool_tier (cognito.tf), both later than 5.70.
      version = "~> 5.100"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = merge(var.tags, { project = "mercato", managed-by = "terraform" })
  }
}
