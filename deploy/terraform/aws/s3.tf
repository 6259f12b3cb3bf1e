# Analytics results: the analytics service writes final windows as JSON lines partitioned by
# date (MERCATO_ANALYTICS_ENGINE__RESULTS_URL=s3://BUCKET/results). Private, versioned,
# encrypted with the data key, TLS only, access logged to a second bucket.

resource "aws_s3_bucket" "analytics_results" {
  #checkov:skip=CKV_AWS_144:Results are derived data, recomputable by replaying the orders topic (mercato analytics replay, or the Spark job on Dataproc); a second-region copy would double storage for nothing that cannot be rebuilt.
  #checkov:skip=CKV2_AWS_62:Nothing consumes object-created events: readers list the date partitions, and new windows are also published on the analytics-results Kafka topic.
  bucket_prefix = "${var.name_prefix}-analytics-"
  force_destroy = false
}

resource "aws_s3_bucket_public_access_block" "analytics_results" {
  bucket                  = aws_s3_bucket.analytics_results.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "analytics_results" {
  bucket = aws_s3_bucket.analytics_results.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "analytics_results" {
  bucket = aws_s3_bucket.analytics_results.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "analytics_results" {
  bucket = aws_s3_bucket.analytics_results.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.data.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "analytics_results" {
  bucket = aws_s3_bucket.analytics_results.id
  rule {
    id     = "expire"
    status = "Enabled"
    filter {}
    expiration {
      days = var.analytics_results_expiry_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_logging" "analytics_results" {
  bucket        = aws_s3_bucket.analytics_results.id
  target_bucket = aws_s3_bucket.access_logs.id
  target_prefix = "analytics-results/"
}

data "aws_iam_policy_document" "analytics_results_tls" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.analytics_results.arn, "${aws_s3_bucket.analytics_results.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "analytics_results" {
  bucket = aws_s3_bucket.analytics_results.id
  policy = data.aws_iam_policy_document.analytics_results_tls.json
}

# Server access logs of the results bucket.
resource "aws_s3_bucket" "access_logs" {
  #checkov:skip=CKV_AWS_18:This is the access-log bucket; logging it into itself would log its own log deliveries in a loop.
  #checkov:skip=CKV_AWS_144:Access logs are an audit trail of one regional bucket; CloudTrail covers the account across regions.
  #checkov:skip=CKV2_AWS_62:Nothing consumes log-delivery events.
  #checkov:skip=CKV_AWS_145:S3 server access logging only delivers to buckets encrypted with SSE-S3 (AES256), not SSE-KMS (AWS documentation, "Enabling Amazon S3 server access logging").
  bucket_prefix = "${var.name_prefix}-access-logs-"
  force_destroy = false
}

resource "aws_s3_bucket_public_access_block" "access_logs" {
  bucket                  = aws_s3_bucket.access_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    id     = "expire"
    status = "Enabled"
    filter {}
    expiration {
      days = var.log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

# The S3 logging service may write here, and only for the results bucket of this account.
data "aws_iam_policy_document" "access_logs" {
  statement {
    sid       = "S3ServerAccessLogs"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.access_logs.arn}/*"]
    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = [aws_s3_bucket.analytics_results.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.access_logs.arn, "${aws_s3_bucket.access_logs.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  policy = data.aws_iam_policy_document.access_logs.json
}
