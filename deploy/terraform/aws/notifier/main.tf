# The notifier as an AWS Lambda: order-events SQS queue (+ dead-letter queue) → Lambda
# (provided.al2023, ReportBatchItemFailures) → DynamoDB `notifications` table, with an execution
# role that can do exactly that and nothing more. See docs/notifier-lambda.md.

terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.70"
    }
  }
}

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}

locals {
  name = "${var.name_prefix}-notifier"
  tags = merge(var.tags, { component = "notifier" })
}

# One key for everything this module stores at rest (queues, table, logs, env vars).
resource "aws_kms_key" "notifier" {
  description             = "${local.name}: SQS, DynamoDB, logs and Lambda environment"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
  tags                    = local.tags
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
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
  statement {
    sid       = "CloudWatchLogsUse"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${data.aws_region.current.name}.amazonaws.com"]
    }
  }
}

resource "aws_sqs_queue" "dead_letter" {
  name                      = "${var.queue_name}-dlq"
  message_retention_seconds = 1209600 # 14 days
  kms_master_key_id         = aws_kms_key.notifier.arn
  tags                      = local.tags
}

resource "aws_sqs_queue" "order_events" {
  name                       = var.queue_name
  message_retention_seconds  = 1209600 # 14 days, as the seed
  visibility_timeout_seconds = var.timeout_seconds * 6
  kms_master_key_id          = aws_kms_key.notifier.arn
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letter.arn
    maxReceiveCount     = var.max_receive_count
  })
  tags = local.tags
}

resource "aws_dynamodb_table" "notifications" {
  name         = var.table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "event_id"

  attribute {
    name = "event_id"
    type = "S"
  }
  attribute {
    name = "user_id"
    type = "S"
  }
  attribute {
    name = "order_id"
    type = "S"
  }
  # Zero-padded created_at (Unix ms) + "#" + record id: oldest first, ties broken by id, so
  # a page's cursor is a key range start (services/notifications/src/dynamo.rs).
  attribute {
    name = "created_sort"
    type = "S"
  }

  global_secondary_index {
    name            = "user_id-created_at"
    hash_key        = "user_id"
    range_key       = "created_sort"
    projection_type = "ALL"
  }
  global_secondary_index {
    name            = "order_id-created_at"
    hash_key        = "order_id"
    range_key       = "created_sort"
    projection_type = "ALL"
  }

  point_in_time_recovery {
    enabled = true
  }
  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.notifier.arn
  }
  deletion_protection_enabled = true
  tags                        = local.tags
}

resource "aws_cloudwatch_log_group" "notifier" {
  name              = "/aws/lambda/${local.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.notifier.arn
  tags              = local.tags
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "notifier" {
  name               = local.name
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

# Least privilege: read and acknowledge its own queue, put into its own table, write its own logs
# and traces, use its own key.
data "aws_iam_policy_document" "notifier" {
  statement {
    sid       = "ConsumeOrderEvents"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.order_events.arn]
  }
  statement {
    sid       = "WriteNotifications"
    actions   = ["dynamodb:PutItem"]
    resources = [aws_dynamodb_table.notifications.arn]
  }
  statement {
    sid       = "WriteLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.notifier.arn}:*"]
  }
  statement {
    sid       = "UseKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.notifier.arn]
  }
  statement {
    sid       = "Traces"
    actions   = ["xray:PutTraceSegments", "xray:PutTelemetryRecords"]
    resources = ["*"] # X-Ray has no resource-level permissions for these actions
  }
}

resource "aws_iam_role_policy" "notifier" {
  name   = local.name
  role   = aws_iam_role.notifier.id
  policy = data.aws_iam_policy_document.notifier.json
}

resource "aws_lambda_function" "notifier" {
  #checkov:skip=CKV_AWS_116:The function is SQS-triggered; failed records go to the source queue's dead-letter queue (redrive policy above), which is where AWS delivers them for event source mappings.
  #checkov:skip=CKV_AWS_117:The function only calls DynamoDB and CloudWatch over AWS endpoints; a VPC attachment would add NAT cost and cold-start latency for no reachable private resource.
  #checkov:skip=CKV_AWS_272:Code signing needs an AWS Signer profile the platform does not operate; the artefact is built from source in CI and uploaded by Terraform.
  function_name                  = local.name
  role                           = aws_iam_role.notifier.arn
  runtime                        = "provided.al2023"
  handler                        = "bootstrap"
  architectures                  = [var.architecture]
  filename                       = var.package_path
  source_code_hash               = filebase64sha256(var.package_path)
  memory_size                    = var.memory_mb
  timeout                        = var.timeout_seconds
  reserved_concurrent_executions = var.reserved_concurrency
  kms_key_arn                    = aws_kms_key.notifier.arn

  environment {
    variables = {
      NOTIFICATIONS_TABLE = aws_dynamodb_table.notifications.name
      LOG_LEVEL           = "info"
    }
  }
  tracing_config {
    mode = "Active"
  }
  logging_config {
    log_format = "JSON"
    log_group  = aws_cloudwatch_log_group.notifier.name
  }
  tags = local.tags
}

resource "aws_lambda_event_source_mapping" "order_events" {
  event_source_arn                   = aws_sqs_queue.order_events.arn
  function_name                      = aws_lambda_function.notifier.arn
  batch_size                         = var.batch_size
  maximum_batching_window_in_seconds = var.batching_window_seconds
  function_response_types            = ["ReportBatchItemFailures"]
  scaling_config {
    maximum_concurrency = var.reserved_concurrency
  }
}
