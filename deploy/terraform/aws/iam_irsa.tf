# IAM roles for service accounts (IRSA): each service that calls an AWS API assumes its own
# role, trusted only for its own ServiceAccount in var.k8s_namespace, allowed only its own
# tables, queue, bucket and keys. gateway, users and products call no AWS API and get no role.
# The OpenTelemetry Collector (ServiceAccount otel-collector, deploy/k8s/overlays/aws-eks/
# otel-collector.yaml) gets one too, to send the services' spans to X-Ray.

locals {
  notifications_table_arn = "arn:${local.partition}:dynamodb:${var.region}:${local.account_id}:table/${module.notifier.table_name}"

  irsa_services = toset(["orders", "payments", "notifications", "analytics", "otel-collector"])
}

data "aws_iam_policy_document" "irsa_trust" {
  for_each = local.irsa_services
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${each.key}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "irsa" {
  for_each             = local.irsa_services
  name                 = "${var.name_prefix}-${each.key}"
  description          = "IRSA role of the ${each.key} service (ServiceAccount ${var.k8s_namespace}/${each.key})"
  assume_role_policy   = data.aws_iam_policy_document.irsa_trust[each.key].json
  max_session_duration = 3600
}

# orders: its table, its indexes and its outbox table, with exactly the calls the store
# (services/orders/src/dynamo.rs), its Idempotency-Key records (crates/kit/src/idempotency/
# dynamo.rs) and its outbox relay (crates/bus/src/dynamo.rs) make; TransactWriteItems needs no
# action of its own, IAM checks each Put/Update in it. Sending order events to the notifier's
# queue (encrypted with the notifier's key).
data "aws_iam_policy_document" "orders" {
  statement {
    sid = "OrdersTable"
    # DescribeTable: the readiness probe.
    actions   = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:DescribeTable"]
    resources = [aws_dynamodb_table.orders.arn]
  }
  statement {
    sid       = "OrdersIndexes"
    actions   = ["dynamodb:Query"]
    resources = ["${aws_dynamodb_table.orders.arn}/index/*"]
  }
  statement {
    sid       = "OrdersOutbox"
    actions   = ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:Query"]
    resources = [aws_dynamodb_table.outbox["orders"].arn]
  }
  statement {
    sid       = "SendOrderEvents"
    actions   = ["sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"]
    resources = [module.notifier.queue_arn]
  }
  statement {
    sid       = "UseKeys"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn, module.notifier.kms_key_arn]
  }
}

# payments: its table, its index and its outbox table, as orders (services/payments/src/
# dynamo.rs; DeleteItem releases the claim of an Idempotency-Key whose request failed).
data "aws_iam_policy_document" "payments" {
  statement {
    sid = "PaymentsTable"
    # DescribeTable: the readiness probe.
    actions   = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:DescribeTable"]
    resources = [aws_dynamodb_table.payments.arn]
  }
  statement {
    sid       = "PaymentsIndex"
    actions   = ["dynamodb:Query"]
    resources = ["${aws_dynamodb_table.payments.arn}/index/*"]
  }
  statement {
    sid       = "PaymentsOutbox"
    actions   = ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:Query"]
    resources = [aws_dynamodb_table.outbox["payments"].arn]
  }
  statement {
    sid       = "UseKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]
  }
}

# notifications: serves the records the Lambda writes (GET /api/v1/notifications) and, as
# `mercato serve notifications` runs the same idempotent consumer as the Lambda, may consume
# the queue and put records too (a conditional put per event id: never a duplicate record).
# The calls of services/notifications/src/dynamo.rs: Query on the two indexes (by user, by
# order), Scan for the unfiltered listing (it stops after `limit` records), DescribeTable for
# readiness.
data "aws_iam_policy_document" "notifications" {
  statement {
    sid       = "NotificationsTable"
    actions   = ["dynamodb:PutItem", "dynamodb:Scan", "dynamodb:DescribeTable"]
    resources = [local.notifications_table_arn]
  }
  statement {
    sid       = "NotificationsIndexes"
    actions   = ["dynamodb:Query"]
    resources = ["${local.notifications_table_arn}/index/*"]
  }
  statement {
    sid       = "ConsumeOrderEvents"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"]
    resources = [module.notifier.queue_arn]
  }
  statement {
    sid       = "UseKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [module.notifier.kms_key_arn]
  }
}

# analytics: writes and reads its result objects.
data "aws_iam_policy_document" "analytics" {
  statement {
    sid       = "ListResults"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.analytics_results.arn]
  }
  statement {
    sid       = "ReadWriteResults"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.analytics_results.arn}/*"]
  }
  statement {
    sid       = "UseKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]
  }
}

# otel-collector: the awsxray exporter's one call (deploy/observability/collector/eks.yaml).
# PutTraceSegments has no resource-level permissions: "*" is the only resource it takes.
data "aws_iam_policy_document" "otel_collector" {
  statement {
    sid       = "PutTraceSegments"
    actions   = ["xray:PutTraceSegments"]
    resources = ["*"]
  }
}

locals {
  irsa_policies = {
    orders           = data.aws_iam_policy_document.orders.json
    payments         = data.aws_iam_policy_document.payments.json
    notifications    = data.aws_iam_policy_document.notifications.json
    analytics        = data.aws_iam_policy_document.analytics.json
    "otel-collector" = data.aws_iam_policy_document.otel_collector.json
  }
}

resource "aws_iam_role_policy" "irsa" {
  for_each = local.irsa_services
  name     = "${var.name_prefix}-${each.key}"
  role     = aws_iam_role.irsa[each.key].id
  policy   = local.irsa_policies[each.key]
}
