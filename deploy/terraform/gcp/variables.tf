# Inputs of the GCP root module: the analytics side of Mercato in asia-south1 (Mumbai), next
# to the AWS side in ap-south-1 and Confluent Cloud in the same metro.

variable "project_id" {
  description = "GCP project that holds everything here."
  type        = string
}

variable "region" {
  description = "Region of the bucket, network, Dataproc cluster, Cloud Run service and registry (the seed's is asia-south1)."
  type        = string
  default     = "asia-south1"
}

variable "name_prefix" {
  description = "Prefix of every resource name (\"mercato-prod\" -> \"mercato-prod-analytics\")."
  type        = string
  default     = "mercato-prod"
}

variable "subnet_cidr" {
  description = "Range of the subnet of the Dataproc nodes and serverless batches (private, with Private Google Access)."
  type        = string
  default     = "10.40.0.0/22"
}

variable "dataproc_enabled" {
  description = "Create the Dataproc cluster that runs the PySpark streaming job (analytics/spark/job.py). Off: run the job as Dataproc Serverless batches instead, which need only the subnet, service account and buckets created here (docs/deploy.md)."
  type        = bool
  default     = true
}

variable "dataproc_image_version" {
  description = "Dataproc image (Spark 3.5 on Debian 12)."
  type        = string
  default     = "2.2-debian12"
}

variable "dataproc_master_machine_type" {
  description = "Machine type of the Dataproc master."
  type        = string
  default     = "n2-standard-4"
}

variable "dataproc_worker_machine_type" {
  description = "Machine type of the Dataproc workers."
  type        = string
  default     = "n2-standard-4"
}

variable "dataproc_workers" {
  description = "Number of primary Dataproc workers (2 or more)."
  type        = number
  default     = 2
}

variable "analytics_image" {
  description = "Image of the Rust analytics service for Cloud Run, in this project's Artifact Registry (REGION-docker.pkg.dev/PROJECT/REPO/mercato@sha256:...). Empty: no Cloud Run service (the analytics service runs on EKS)."
  type        = string
  default     = ""
}

variable "analytics_invokers" {
  description = "IAM members allowed to call the Cloud Run analytics API (e.g. \"group:analysts@example.com\"). The service never allows unauthenticated calls."
  type        = list(string)
  default     = []
}

variable "kafka_bootstrap_servers" {
  description = "Confluent Cloud bootstrap endpoint (terraform -chdir=deploy/terraform/confluent output -raw bootstrap_servers)."
  type        = string
  default     = "pkc-00000.ap-south-1.aws.confluent.cloud:9092"
}

variable "results_retention_days" {
  description = "Days after which analytics result objects are deleted."
  type        = number
  default     = 365
}

variable "log_retention_days" {
  description = "Days after which bucket access logs are deleted."
  type        = number
  default     = 365
}

variable "labels" {
  description = "Labels added to every resource (on top of project = mercato)."
  type        = map(string)
  default     = {}
}
