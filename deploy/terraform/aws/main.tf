# Mercato on AWS (ap-south-1): the stores and queue of the services running on an existing EKS
# cluster (deploy/k8s/overlays/aws-eks), their IAM roles (IRSA), the image repository, and the
# notifier Lambda (module ./notifier). Apply order and the values it hands to Kubernetes are in
# docs/deploy.md.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

# The cluster's VPC: its CIDR holds the ALB's addresses, the proxies the gateway trusts for
# X-Forwarded-For (MERCATO_RATE_LIMIT__TRUSTED_PROXIES in k8s_settings_env).
data "aws_vpc" "eks" {
  id = var.vpc_id
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  # "oidc.eks.REGION.amazonaws.com/id/ID", the prefix of the token's condition keys.
  oidc_issuer = element(split("oidc-provider/", var.eks_oidc_provider_arn), 1)
}

# One customer-managed key for the data at rest created here: DynamoDB tables, the database,
# its Performance Insights, master password secret and logs, the image repository, S3.
resource "aws_kms_key" "data" {
  description             = "${var.name_prefix}: DynamoDB, RDS, ECR, S3 and logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "data" {
  name          = "alias/${var.name_prefix}-data"
  target_key_id = aws_kms_key.data.key_id
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_111:A KMS key policy's "*" resource means this key only; the account root statement is AWS's required default that lets IAM policies grant use of the key.
  #checkov:skip=CKV_AWS_356:Same: in a key policy the resource "*" is the key itself, not every resource.
  #checkov:skip=CKV_AWS_109:Same: key administration stays with the account, as AWS's default key policy does; without it the key becomes unmanageable.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }
  statement {
    sid       = "CloudWatchLogsUse"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/aws/rds/instance/${var.name_prefix}-postgres/*"]
    }
  }
}
