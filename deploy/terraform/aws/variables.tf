# Inputs of the AWS root module. The EKS cluster and its VPC exist already (eksctl, the
# terraform-aws-modules/eks module or the console); this module takes what it needs from them.

variable "region" {
  description = "AWS region of everything here (the seed's is ap-south-1, Mumbai)."
  type        = string
  default     = "ap-south-1"
}

variable "name_prefix" {
  description = "Prefix of every resource name: tables, queue, database, roles, repository (\"mercato-prod\" -> \"mercato-prod-orders\")."
  type        = string
  default     = "mercato-prod"
}

variable "vpc_id" {
  description = "VPC of the EKS cluster; the database is created in it."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets (two or more availability zones) for the database's subnet group."
  type        = list(string)
  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "RDS Multi-AZ needs subnets in at least two availability zones."
  }
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider (aws eks describe-cluster --query cluster.identity.oidc.issuer, then the matching provider in IAM: arn:aws:iam::ACCOUNT:oidc-provider/oidc.eks.REGION.amazonaws.com/id/ID). The IRSA roles trust it."
  type        = string
  validation {
    condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+", var.eks_oidc_provider_arn))
    error_message = "eks_oidc_provider_arn must be an IAM OIDC provider ARN."
  }
}

variable "eks_node_security_group_id" {
  description = "Security group of the cluster's nodes (or the cluster security group, for pods on the VPC CNI); only it may reach PostgreSQL on 5432."
  type        = string
}

variable "k8s_namespace" {
  description = "Namespace of the Mercato workloads (deploy/k8s/base); the IRSA roles trust only its service accounts."
  type        = string
  default     = "mercato"
}

variable "postgres_version" {
  description = "RDS PostgreSQL engine version (major.minor); the parameter group family follows its major version."
  type        = string
  default     = "16.4"
}

variable "db_instance_class" {
  description = "RDS instance class of the PostgreSQL database (users, products)."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_allocated_storage_gb" {
  description = "Initial storage of the database; storage autoscaling may grow it to db_max_allocated_storage_gb."
  type        = number
  default     = 20
}

variable "db_max_allocated_storage_gb" {
  description = "Upper bound of RDS storage autoscaling."
  type        = number
  default     = 100
}

variable "db_backup_retention_days" {
  description = "Days of automated backups (point-in-time restore window) of the database."
  type        = number
  default     = 7
}

variable "certificate_arn" {
  description = "ACM certificate (in var.region) of the public hostname; the gateway's ALB Ingress terminates TLS with it. Passed through to the aws-eks overlay (k8s_values_env)."
  type        = string
  default     = "arn:aws:acm:ap-south-1:111122223333:certificate/00000000-0000-0000-0000-000000000000"
}

variable "kafka_bootstrap_servers" {
  description = "Confluent Cloud bootstrap endpoint (terraform -chdir=deploy/terraform/confluent output -raw bootstrap_servers), written into k8s_settings_env. Kafka credentials are not Terraform inputs here: they go into the mercato-secrets Secret."
  type        = string
  default     = "pkc-00000.ap-south-1.aws.confluent.cloud:9092"
}

variable "notifier_package_path" {
  description = "The notifier Lambda's zip, built by `cargo lambda build --profile lambda-package --arm64 -p notifications --features lambda --bin bootstrap --output-format zip` (relative to this directory)."
  type        = string
  default     = "../../../target/lambda/bootstrap/bootstrap.zip"
}

variable "ecr_keep_images" {
  description = "How many tagged images the ECR lifecycle policy keeps (older ones expire)."
  type        = number
  default     = 50
}

variable "log_retention_days" {
  description = "Retention of the CloudWatch log groups created here (database logs)."
  type        = number
  default     = 365
}

variable "analytics_results_expiry_days" {
  description = "Days after which analytics result objects in S3 expire (noncurrent versions expire after 30 days)."
  type        = number
  default     = 365
}

variable "cognito_user_pool_tier" {
  description = "Feature plan of the Cognito user pool: ESSENTIALS (managed login, password reuse prevention) or PLUS (adds threat protection, enforced: compromised-credential checks and adaptive authentication; billed per monthly active user at a higher rate). LITE lacks password reuse prevention, which the password policy uses."
  type        = string
  default     = "ESSENTIALS"
  validation {
    condition     = contains(["ESSENTIALS", "PLUS"], var.cognito_user_pool_tier)
    error_message = "cognito_user_pool_tier must be ESSENTIALS or PLUS."
  }
}

variable "cognito_mfa" {
  description = "MFA of the Cognito user pool: OPTIONAL (each user may add an authenticator app; recommended for admins) or ON (every user must set one up at first sign-in)."
  type        = string
  default     = "OPTIONAL"
  validation {
    condition     = contains(["OPTIONAL", "ON"], var.cognito_mfa)
    error_message = "cognito_mfa must be OPTIONAL or ON."
  }
}

variable "cognito_self_sign_up" {
  description = "Whether shoppers may create their own Cognito account on the managed login pages; false: only administrators create users (aws cognito-idp admin-create-user)."
  type        = bool
  default     = true
}

variable "cognito_callback_urls" {
  description = "Where the managed login pages may send the browser back with an authorization code (the web shop's sign-in callback): https, or http://localhost for development."
  type        = list(string)
  default     = ["https://shop.example.com/auth/callback"]
}

variable "cognito_logout_urls" {
  description = "Where the Cognito logout endpoint may send the browser after signing out."
  type        = list(string)
  default     = ["https://shop.example.com/"]
}

variable "cognito_refresh_token_days" {
  description = "Lifetime of Cognito refresh tokens in days (rotated on every use; access and ID tokens live 15 minutes)."
  type        = number
  default     = 30
  validation {
    condition     = var.cognito_refresh_token_days >= 1 && var.cognito_refresh_token_days <= 3650
    error_message = "cognito_refresh_token_days must be between 1 and 3650 (Cognito's limits)."
  }
}

variable "cognito_domain_prefix" {
  description = "Prefix of the Cognito domain of the managed login pages (https://PREFIX.auth.REGION.amazoncognito.com); it must be unique in the region and may not contain aws, amazon or cognito. null: name_prefix."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags added to every resource (on top of project = mercato)."
  type        = map(string)
  default     = {}
}
