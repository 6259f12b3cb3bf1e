# Outputs of the Confluent Cloud module.

output "bootstrap_servers" {
  description = "KAFKA_BOOTSTRAP_SERVERS (host:port, SASL_SSL/PLAIN) for the AWS and GCP modules and the Spark job."
  value       = replace(data.confluent_kafka_cluster.this.bootstrap_endpoint, "SASL_SSL://", "")
}

output "topics" {
  description = "The topics created, with partitions and retention."
  value       = { for name, topic in confluent_kafka_topic.topics : name => { partitions = topic.partitions_count, retention_ms = topic.config["retention.ms"] } }
}

output "client_credentials" {
  description = "Kafka API key and secret of each client (orders, payments, analytics, spark), for the mercato-secrets Secret and the GCP Secret Manager secrets: terraform output -json client_credentials."
  sensitive   = true
  value = {
    for name, key in confluent_api_key.clients : name => {
      api_key    = key.id
      api_secret = key.secret
    }
  }
}
