# PostgreSQL for the SQL stores (users, products; orders and payments when configured with a
# SQL store instead of DynamoDB): Multi-AZ, encrypted, TLS only, reachable only from the EKS
# nodes, master password kept by RDS in Secrets Manager, IAM authentication available.

locals {
  db_identifier = "${var.name_prefix}-postgres"
  pg_major      = split(".", var.postgres_version)[0]
}

resource "aws_db_subnet_group" "postgres" {
  name       = local.db_identifier
  subnet_ids = var.private_subnet_ids
}

resource "aws_security_group" "postgres" {
  name        = local.db_identifier
  description = "PostgreSQL of ${var.name_prefix}: 5432 from the EKS nodes only"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "postgres_from_eks" {
  security_group_id            = aws_security_group.postgres.id
  description                  = "PostgreSQL from the EKS nodes and pods"
  referenced_security_group_id = var.eks_node_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_db_parameter_group" "postgres" {
  name        = "${local.db_identifier}-pg${local.pg_major}"
  family      = "postgres${local.pg_major}"
  description = "${local.db_identifier}: TLS only, slow and DDL statements logged"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  parameter {
    name  = "log_statement"
    value = "ddl"
  }
  parameter {
    name  = "log_min_duration_statement"
    value = "500"
  }

  lifecycle {
    create_before_destroy = true
  }
}

# RDS writes its logs here; created first so they are encrypted and expire.
resource "aws_cloudwatch_log_group" "postgres" {
  for_each          = toset(["postgresql", "upgrade"])
  name              = "/aws/rds/instance/${local.db_identifier}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.data.arn
}

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name               = "${local.db_identifier}-monitoring"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "postgres" {
  identifier     = local.db_identifier
  engine         = "postgres"
  engine_version = var.postgres_version
  instance_class = var.db_instance_class
  db_name        = "mercato"
  username       = "mercato"
  port           = 5432

  # RDS generates and rotates the master password in Secrets Manager (no password in state).
  manage_master_user_password         = true
  master_user_secret_kms_key_id       = aws_kms_key.data.arn
  iam_database_authentication_enabled = true

  allocated_storage     = var.db_allocated_storage_gb
  max_allocated_storage = var.db_max_allocated_storage_gb
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.data.arn

  multi_az               = true
  db_subnet_group_name   = aws_db_subnet_group.postgres.name
  vpc_security_group_ids = [aws_security_group.postgres.id]
  publicly_accessible    = false
  parameter_group_name   = aws_db_parameter_group.postgres.name

  backup_retention_period    = var.db_backup_retention_days
  backup_window              = "20:00-21:00" # 01:30-02:30 IST
  maintenance_window         = "sun:21:30-sun:22:30"
  copy_tags_to_snapshot      = true
  delete_automated_backups   = false
  deletion_protection        = true
  skip_final_snapshot        = false
  final_snapshot_identifier  = "${local.db_identifier}-final"
  auto_minor_version_upgrade = true

  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.data.arn
  performance_insights_retention_period = 7
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]

  depends_on = [aws_cloudwatch_log_group.postgres]
}
