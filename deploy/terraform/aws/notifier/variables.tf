# Inputs of the notifier module.

variable "name_prefix" {
  description = "Prefix of every resource name, e.g. \"mercato-prod\"."
  type        = string
}

variable "queue_name" {
  description = "Name of the order-events queue (the seed's is \"ecommerce-order-events-dev\"). The dead-letter queue is \"<name>-dlq\"."
  type        = string
  default     = "ecommerce-order-events-dev"
}

variable "table_name" {
  description = "DynamoDB table of notification records (the function reads it from NOTIFICATIONS_TABLE)."
  type        = string
  default     = "notifications"
}

variable "package_path" {
  description = "Path of the zip built by `cargo lambda build --profile lambda-package --arm64 -p notifications --features lambda --bin bootstrap --output-format zip`."
  type        = string
  default     = "../../../../target/lambda/bootstrap/bootstrap.zip"
}

variable "architecture" {
  description = "\"arm64\" (Graviton, build with --arm64) or \"x86_64\" (build with --x86-64)."
  type        = string
  default     = "arm64"
  validation {
    condition     = contains(["arm64", "x86_64"], var.architecture)
    error_message = "architecture must be arm64 or x86_64."
  }
}

variable "memory_mb" {
  description = "Lambda memory; the Rust handler needs little, 128 MB is plenty for batches of 10."
  type        = number
  default     = 128
}

variable "timeout_seconds" {
  description = "Lambda timeout. The queue's visibility timeout is six times this, as AWS recommends."
  type        = number
  default     = 10
}

variable "reserved_concurrency" {
  description = "Upper bound on concurrent executions (and on the event source mapping's concurrency), protecting DynamoDB and the account's pool."
  type        = number
  default     = 10
}

variable "batch_size" {
  description = "Messages per invocation."
  type        = number
  default     = 10
}

variable "batching_window_seconds" {
  description = "How long the event source mapping may wait to fill a batch."
  type        = number
  default     = 1
}

variable "max_receive_count" {
  description = "Receives before a message moves to the dead-letter queue."
  type        = number
  default     = 5
}

variable "log_retention_days" {
  description = "CloudWatch retention of the function's logs."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
