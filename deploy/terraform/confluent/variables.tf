# Inputs of the Confluent Cloud module: an existing environment and Kafka cluster (the seed's
# is on AWS ap-south-1, next to EKS), the topics' shape, the consumer groups to authorise.

variable "environment_id" {
  description = "Confluent Cloud environment id (env-xxxxx): confluent environment list."
  type        = string
}

variable "kafka_cluster_id" {
  description = "Kafka cluster id (lkc-xxxxx) in that environment: confluent kafka cluster list. Create it on AWS ap-south-1 so EKS, Lambda and the cluster share a region."
  type        = string
}

variable "name_prefix" {
  description = "Prefix of the service accounts' names (\"mercato-prod\" -> \"mercato-prod-orders\")."
  type        = string
  default     = "mercato-prod"
}

variable "topics" {
  description = "Topics by name: partitions and retention. orders and payments are keyed by order id (one order's events stay in order); 6 partitions let 1, 2, 3 or 6 consumers share them evenly. analytics-results carries one small record per window. See docs/deploy.md for the reasoning."
  type = map(object({
    partitions     = number
    retention_days = number
  }))
  default = {
    "orders"            = { partitions = 6, retention_days = 7 }
    "payments"          = { partitions = 6, retention_days = 7 }
    "analytics-results" = { partitions = 3, retention_days = 30 }
  }
}

variable "orders_consumer_group" {
  description = "Consumer group of the orders service on the payments topic (services/orders/src/saga.rs CONSUMER_GROUP)."
  type        = string
  default     = "orders-status"
}

variable "analytics_consumer_group" {
  description = "Consumer group of the analytics service on the orders topic (services/analytics/src/consumer.rs CONSUMER_GROUP)."
  type        = string
  default     = "analytics"
}

variable "spark_consumer_group_prefix" {
  description = "Prefix of the Spark job's consumer groups (Spark's Kafka source names them spark-kafka-source-<uuid> unless the job sets kafka.group.id / groupIdPrefix)."
  type        = string
  default     = "spark-kafka-source-"
}
