# Mercato's Kafka on Confluent Cloud: the three topics, and one service account + API key per
# client with ACLs for exactly what it produces and consumes:
#   orders     produces orders;            consumes payments (group orders-status)
#   payments   produces payments
#   analytics  consumes orders (group analytics); produces analytics-results
#   spark      consumes orders; produces analytics-results (the PySpark job on Dataproc)
# A separate topic-manager account (CloudClusterAdmin on this cluster only) creates the
# topics and ACLs. API secrets end up in the Terraform state: keep the state in an encrypted,
# access-controlled backend.

data "confluent_environment" "this" {
  id = var.environment_id
}

data "confluent_kafka_cluster" "this" {
  id = var.kafka_cluster_id
  environment {
    id = data.confluent_environment.this.id
  }
}

resource "confluent_service_account" "topic_manager" {
  display_name = "${var.name_prefix}-topic-manager"
  description  = "Creates Mercato's topics and ACLs (Terraform)"
}

resource "confluent_role_binding" "topic_manager" {
  principal   = "User:${confluent_service_account.topic_manager.id}"
  role_name   = "CloudClusterAdmin"
  crn_pattern = data.confluent_kafka_cluster.this.rbac_crn
}

resource "confluent_api_key" "topic_manager" {
  display_name = "${var.name_prefix}-topic-manager"
  description  = "Kafka API key of the topic manager"
  owner {
    id          = confluent_service_account.topic_manager.id
    api_version = confluent_service_account.topic_manager.api_version
    kind        = confluent_service_account.topic_manager.kind
  }
  managed_resource {
    id          = data.confluent_kafka_cluster.this.id
    api_version = data.confluent_kafka_cluster.this.api_version
    kind        = data.confluent_kafka_cluster.this.kind
    environment {
      id = data.confluent_environment.this.id
    }
  }
  depends_on = [confluent_role_binding.topic_manager]
}

resource "confluent_kafka_topic" "topics" {
  for_each = var.topics
  kafka_cluster {
    id = data.confluent_kafka_cluster.this.id
  }
  topic_name       = each.key
  partitions_count = each.value.partitions
  rest_endpoint    = data.confluent_kafka_cluster.this.rest_endpoint
  config = {
    "cleanup.policy"      = "delete"
    "retention.ms"        = tostring(each.value.retention_days * 24 * 3600 * 1000)
    "min.insync.replicas" = "2"
  }
  credentials {
    key    = confluent_api_key.topic_manager.id
    secret = confluent_api_key.topic_manager.secret
  }
  lifecycle {
    prevent_destroy = true
  }
}

locals {
  clients = {
    orders    = "orders service (EKS): produces orders, consumes payments"
    payments  = "payments service (EKS): produces payments"
    analytics = "analytics service (EKS or Cloud Run): consumes orders, produces analytics-results"
    spark     = "PySpark job (Dataproc): consumes orders, produces analytics-results"
  }
  # client, resource type, resource name, pattern, operation
  acls = [
    ["orders", "TOPIC", "orders", "LITERAL", "WRITE"],
    ["orders", "TOPIC", "orders", "LITERAL", "DESCRIBE"],
    ["orders", "TOPIC", "payments", "LITERAL", "READ"],
    ["orders", "TOPIC", "payments", "LITERAL", "DESCRIBE"],
    ["orders", "GROUP", var.orders_consumer_group, "LITERAL", "READ"],
    ["payments", "TOPIC", "payments", "LITERAL", "WRITE"],
    ["payments", "TOPIC", "payments", "LITERAL", "DESCRIBE"],
    ["analytics", "TOPIC", "orders", "LITERAL", "READ"],
    ["analytics", "TOPIC", "orders", "LITERAL", "DESCRIBE"],
    ["analytics", "GROUP", var.analytics_consumer_group, "LITERAL", "READ"],
    ["analytics", "TOPIC", "analytics-results", "LITERAL", "WRITE"],
    ["analytics", "TOPIC", "analytics-results", "LITERAL", "DESCRIBE"],
    ["spark", "TOPIC", "orders", "LITERAL", "READ"],
    ["spark", "TOPIC", "orders", "LITERAL", "DESCRIBE"],
    ["spark", "GROUP", var.spark_consumer_group_prefix, "PREFIXED", "READ"],
    ["spark", "TOPIC", "analytics-results", "LITERAL", "WRITE"],
    ["spark", "TOPIC", "analytics-results", "LITERAL", "DESCRIBE"],
  ]
}

resource "confluent_service_account" "clients" {
  for_each     = local.clients
  display_name = "${var.name_prefix}-${each.key}"
  description  = "Mercato ${each.value}"
}

resource "confluent_api_key" "clients" {
  for_each     = local.clients
  display_name = "${var.name_prefix}-${each.key}"
  description  = "Kafka API key of the Mercato ${each.key} client"
  owner {
    id          = confluent_service_account.clients[each.key].id
    api_version = confluent_service_account.clients[each.key].api_version
    kind        = confluent_service_account.clients[each.key].kind
  }
  managed_resource {
    id          = data.confluent_kafka_cluster.this.id
    api_version = data.confluent_kafka_cluster.this.api_version
    kind        = data.confluent_kafka_cluster.this.kind
    environment {
      id = data.confluent_environment.this.id
    }
  }
}

resource "confluent_kafka_acl" "clients" {
  for_each = { for acl in local.acls : join(":", acl) => acl }
  kafka_cluster {
    id = data.confluent_kafka_cluster.this.id
  }
  resource_type = each.value[1]
  resource_name = each.value[2]
  pattern_type  = each.value[3]
  principal     = "User:${confluent_service_account.clients[each.value[0]].id}"
  host          = "*"
  operation     = each.value[4]
  permission    = "ALLOW"
  rest_endpoint = data.confluent_kafka_cluster.this.rest_endpoint
  credentials {
    key    = confluent_api_key.topic_manager.id
    secret = confluent_api_key.topic_manager.secret
  }
  depends_on = [confluent_kafka_topic.topics]
}
