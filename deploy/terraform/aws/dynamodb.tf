# The seed's DynamoDB tables of the orders and payments services (the notifications table is
# the notifier module's). On demand capacity, point-in-time recovery, the data key, and
# deletion protection.

resource "aws_dynamodb_table" "orders" {
  name         = "${var.name_prefix}-orders"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "order_id"

  attribute {
    name = "order_id"
    type = "S"
  }
  attribute {
    name = "user_id"
    type = "S"
  }
  attribute {
    name = "created_at"
    type = "S"
  }

  # GET /api/v1/orders/user/{user_id}: a user's orders, newest first.
  global_secondary_index {
    name            = "user_id-created_at"
    hash_key        = "user_id"
    range_key       = "created_at"
    projection_type = "ALL"
  }

  point_in_time_recovery {
    enabled = true
  }
  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.data.arn
  }
  deletion_protection_enabled = true
}

resource "aws_dynamodb_table" "payments" {
  name         = "${var.name_prefix}-payments"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "payment_id"

  attribute {
    name = "payment_id"
    type = "S"
  }
  attribute {
    name = "order_id"
    type = "S"
  }

  # GET /api/v1/payments/order/{order_id}, and one successful payment per order.
  global_secondary_index {
    name            = "order_id-index"
    hash_key        = "order_id"
    projection_type = "ALL"
  }

  point_in_time_recovery {
    enabled = true
  }
  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.data.arn
  }
  deletion_protection_enabled = true
}
