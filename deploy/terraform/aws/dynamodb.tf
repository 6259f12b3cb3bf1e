# The seed's DynamoDB tables of the orders and payments services, and the transactional outbox
# table of each (`<table>-outbox`); the notifications table is the notifier module's. The key
# schemas, attribute definitions and GSIs are exactly those the stores create for local servers
# (`ensure_table` in services/orders/src/dynamo.rs, services/payments/src/dynamo.rs and
# crates/bus/src/dynamo.rs): a difference here would make a query fail on AWS only. On demand
# capacity, point-in-time recovery, the data key, and deletion protection on every table.

locals {
  # The stores' outbox tables (bus::dynamo::DynamoOutbox): one partition `pk` = "outbox", rows
  # sorted by `seq` (a UUIDv7 string, commit-time order); no index, no TTL (the relay deletes
  # a row once it is published).
  outbox_tables = {
    orders   = "${aws_dynamodb_table.orders.name}-outbox"
    payments = "${aws_dynamodb_table.payments.name}-outbox"
  }
}

# Items told apart by `kind` (services/orders/src/dynamo.rs): `order` (order_id = the order's
# UUID), `event` (order_id = "event#<id>", a processed event id), `counter` (order_id =
# "count#<shard>"), `idempotency` (order_id = "idempotency#<key>", an Idempotency-Key record).
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
  # Zero-padded created_at (Unix ms) + "#" + order id: oldest first, ties broken by id.
  attribute {
    name = "user_sort"
    type = "S"
  }
  # Always "pending", present only while the order is pending (a sparse index).
  attribute {
    name = "pending"
    type = "S"
  }
  attribute {
    name = "expires_at"
    type = "N"
  }
  # Always "processed", on processed-event items only.
  attribute {
    name = "processed"
    type = "S"
  }
  attribute {
    name = "processed_at"
    type = "N"
  }

  # GET /api/v1/orders/user/{user_id}: a user's orders.
  global_secondary_index {
    name            = "user_id-created_at"
    hash_key        = "user_id"
    range_key       = "user_sort"
    projection_type = "ALL"
  }
  # The expiry sweep: pending orders whose expires_at has passed.
  global_secondary_index {
    name            = "pending-expires_at"
    hash_key        = "pending"
    range_key       = "expires_at"
    projection_type = "ALL"
  }
  # Pruning old processed event ids.
  global_secondary_index {
    name            = "processed-processed_at"
    hash_key        = "processed"
    range_key       = "processed_at"
    projection_type = "ALL"
  }

  # Idempotency-Key records carry purge_at (Unix seconds): DynamoDB deletes them after it.
  # Expiry itself is decided exactly by the record's expires_ms, TTL only reclaims space.
  ttl {
    attribute_name = "purge_at"
    enabled        = true
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

# Items told apart by `kind` (services/payments/src/dynamo.rs): `payment` (payment_id = the
# payment's UUID), `active` guard (payment_id = "active#<order_id>": one payment in flight or
# successful per order), `refund` (payment_id = "refund#<id>"), `idempotency` (payment_id =
# "idempotency#<key>"). Only payment items carry order_id and created_at, so only they are in
# the indexes.
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
  # Unix ms.
  attribute {
    name = "created_at"
    type = "N"
  }
  # Always "pending", present only while the payment is pending (a sparse index).
  attribute {
    name = "pending"
    type = "S"
  }

  # GET /api/v1/payments/order/{order_id}.
  global_secondary_index {
    name            = "order_id-created_at"
    hash_key        = "order_id"
    range_key       = "created_at"
    projection_type = "ALL"
  }
  # The reconciler: payments left pending (a crash between charge and record).
  global_secondary_index {
    name            = "pending-created_at"
    hash_key        = "pending"
    range_key       = "created_at"
    projection_type = "ALL"
  }

  # Idempotency-Key records carry purge_at (Unix seconds), as in the orders table.
  ttl {
    attribute_name = "purge_at"
    enabled        = true
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

# The outbox of each store: written in the same TransactWriteItems as the store's change, read
# and deleted by the service's relay.
resource "aws_dynamodb_table" "outbox" {
  for_each     = local.outbox_tables
  name         = each.value
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "pk"
  range_key    = "seq"

  attribute {
    name = "pk"
    type = "S"
  }
  attribute {
    name = "seq"
    type = "S"
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
