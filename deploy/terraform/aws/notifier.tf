# The notifier (order-events queue + dead-letter queue -> Lambda -> DynamoDB notifications
# table): its own module, also checked on its own by scripts/check-lambda. The orders service
# sends to its queue; the notifications service (EKS) reads its table.
module "notifier" {
  source = "./notifier"

  name_prefix  = var.name_prefix
  queue_name   = "${var.name_prefix}-order-events"
  table_name   = "${var.name_prefix}-notifications"
  package_path = var.notifier_package_path
  architecture = "arm64"
  tags         = var.tags
}
