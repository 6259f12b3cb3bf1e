# Outputs of the notifier module: what the orders service and operators need.

output "queue_url" {
  description = "URL of the order-events queue: the orders service's SQS_QUEUE_URL."
  value       = aws_sqs_queue.order_events.id
}

output "queue_arn" {
  description = "ARN of the order-events queue, for the orders service's send permission."
  value       = aws_sqs_queue.order_events.arn
}

output "dead_letter_queue_url" {
  description = "URL of the dead-letter queue, to inspect and redrive poison messages."
  value       = aws_sqs_queue.dead_letter.id
}

output "table_name" {
  description = "The notifications table (NOTIFICATIONS_TABLE)."
  value       = aws_dynamodb_table.notifications.name
}

output "function_name" {
  description = "The Lambda function."
  value       = aws_lambda_function.notifier.function_name
}

output "kms_key_arn" {
  description = "Key encrypting the queues, table, logs and environment; senders to the queue need kms:GenerateDataKey on it."
  value       = aws_kms_key.notifier.arn
}
