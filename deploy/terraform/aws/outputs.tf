# Outputs of the AWS root module: what the image push, the Kubernetes overlay and operators need.

output "ecr_repository_url" {
  description = "Where to push the image (docker push URL:TAG); deploy it by digest (IMAGE in the aws-eks overlay's values.env)."
  value       = aws_ecr_repository.mercato.repository_url
}

output "irsa_role_arns" {
  description = "IAM role of each service that calls AWS APIs, and of the OpenTelemetry Collector (otel-collector), by ServiceAccount name (eks.amazonaws.com/role-arn of that ServiceAccount)."
  value       = { for name, role in aws_iam_role.irsa : name => role.arn }
}

output "orders_table" {
  description = "DynamoDB table of orders (MERCATO_ORDERS__DATABASE_URL=dynamodb://TABLE?region=REGION), GSIs user_id-created_at, pending-expires_at, processed-processed_at; its outbox is TABLE-outbox."
  value       = aws_dynamodb_table.orders.name
}

output "payments_table" {
  description = "DynamoDB table of payments (MERCATO_PAYMENTS__DATABASE_URL=dynamodb://TABLE?region=REGION), GSI order_id-created_at; its outbox is TABLE-outbox."
  value       = aws_dynamodb_table.payments.name
}

output "outbox_tables" {
  description = "The transactional outbox table of each DynamoDB store, by service (the store's table name + \"-outbox\")."
  value       = { for name, table in aws_dynamodb_table.outbox : name => table.name }
}

output "notifications_table" {
  description = "DynamoDB table of notification records (the Lambda's NOTIFICATIONS_TABLE; MERCATO_NOTIFICATIONS__DATABASE_URL of the notifications service), written by the notifier Lambda."
  value       = module.notifier.table_name
}

output "order_events_queue_url" {
  description = "The order-events SQS queue (SQS_QUEUE_URL); its dead-letter queue is order_events_dlq_url."
  value       = module.notifier.queue_url
}

output "order_events_dlq_url" {
  description = "Dead-letter queue of order-events: poison messages land here after the module's max_receive_count."
  value       = module.notifier.dead_letter_queue_url
}

output "notifier_function_name" {
  description = "The notifier Lambda function."
  value       = module.notifier.function_name
}

output "postgres_endpoint" {
  description = "host:port of the PostgreSQL database (database \"mercato\", user \"mercato\"), for DATABASE_URL in the mercato-secrets Secret."
  value       = aws_db_instance.postgres.endpoint
}

output "postgres_master_secret_arn" {
  description = "Secrets Manager secret holding the database master password (RDS-managed, rotated): aws secretsmanager get-secret-value --secret-id ARN."
  value       = aws_db_instance.postgres.master_user_secret[0].secret_arn
}

output "analytics_results_url" {
  description = "Object-store URL of the analytics results (MERCATO_ANALYTICS_ENGINE__RESULTS_URL)."
  value       = "s3://${aws_s3_bucket.analytics_results.bucket}/results"
}

output "kms_key_arn" {
  description = "The data key (tables, database, repository, results bucket, database logs)."
  value       = aws_kms_key.data.arn
}

output "cognito_issuer" {
  description = "Issuer (`iss`) of the Cognito user pool's tokens: the issuer of its entry in auth.issuers (MERCATO_AUTH__ISSUERS)."
  value       = local.cognito_issuer
}

output "cognito_jwks_url" {
  description = "The Cognito user pool's signing keys (JWKS), fetched by every service to verify its tokens: jwks_url in auth.issuers."
  value       = local.cognito_jwks_url
}

output "cognito_client_id" {
  description = "The web shop's public app client: the `client_id` claim of its access tokens (audience in auth.issuers, with audience_claim = \"client_id\")."
  value       = aws_cognito_user_pool_client.web.id
}

output "cognito_user_pool_id" {
  description = "The Cognito user pool (--user-pool-id of aws cognito-idp, e.g. admin-add-user-to-group --group-name admin)."
  value       = aws_cognito_user_pool.mercato.id
}

output "cognito_login_url" {
  description = "Base URL of the managed login pages: /oauth2/authorize, /oauth2/token, /logout."
  value       = "https://${aws_cognito_user_pool_domain.mercato.domain}.auth.${var.region}.amazoncognito.com"
}

output "k8s_values_env" {
  description = "The aws-eks overlay's values.env (role ARNs, the OpenTelemetry Collector's included; certificate) without IMAGE, which the push step appends: see docs/deploy.md."
  value = join("\n", [
    "ORDERS_ROLE_ARN=${aws_iam_role.irsa["orders"].arn}",
    "PAYMENTS_ROLE_ARN=${aws_iam_role.irsa["payments"].arn}",
    "NOTIFICATIONS_ROLE_ARN=${aws_iam_role.irsa["notifications"].arn}",
    "ANALYTICS_ROLE_ARN=${aws_iam_role.irsa["analytics"].arn}",
    "OTEL_COLLECTOR_ROLE_ARN=${aws_iam_role.irsa["otel-collector"].arn}",
    "CERTIFICATE_ARN=${var.certificate_arn}",
    "",
  ])
}

output "k8s_settings_env" {
  description = "The aws-eks overlay's settings.env: region, the DynamoDB stores of orders, payments and notifications, queue URL, Kafka endpoint, results bucket, the Cognito user pool as an external token issuer, production with Stripe as the payment provider (its keys: the mercato-stripe Secret), the VPC's CIDR as the gateway's trusted proxies (the ALB)."
  value = join("\n", [
    "AWS_REGION=${var.region}",
    "MERCATO_ORDERS__DATABASE_URL=dynamodb://${aws_dynamodb_table.orders.name}?region=${var.region}",
    "MERCATO_PAYMENTS__DATABASE_URL=dynamodb://${aws_dynamodb_table.payments.name}?region=${var.region}",
    "MERCATO_NOTIFICATIONS__DATABASE_URL=dynamodb://${module.notifier.table_name}?region=${var.region}",
    "SQS_QUEUE_URL=${module.notifier.queue_url}",
    "KAFKA_BOOTSTRAP_SERVERS=${var.kafka_bootstrap_servers}",
    "KAFKA_SECURITY_PROTOCOL=SASL_SSL",
    "KAFKA_SASL_MECHANISM=PLAIN",
    "MERCATO_ANALYTICS_ENGINE__RESULTS_URL=s3://${aws_s3_bucket.analytics_results.bucket}/results",
    "MERCATO_AUTH__ISSUERS=${local.cognito_issuers_setting}",
    "MERCATO_ENVIRONMENT=production",
    "MERCATO_PAYMENTS__PROVIDER=stripe",
    "MERCATO_PAYMENTS__STRIPE__SECRET_KEY_FILE=/etc/mercato-stripe/secret-key",
    "MERCATO_PAYMENTS__STRIPE__WEBHOOK_SECRET_FILE=/etc/mercato-stripe/webhook-secret",
    "MERCATO_RATE_LIMIT__TRUSTED_PROXIES=[\"${data.aws_vpc.eks.cidr_block}\"]",
    "",
  ])
}
