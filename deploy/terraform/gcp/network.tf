# A private network for the Dataproc nodes (and serverless batches): no external IPs, Private
# Google Access for Cloud Storage and the APIs, Cloud NAT for the one outside destination,
# Confluent Cloud's Kafka endpoint.

resource "google_compute_network" "analytics" {
  name                    = "${var.name_prefix}-analytics"
  auto_create_subnetworks = false

  depends_on = [google_project_service.apis]
}

resource "google_compute_subnetwork" "analytics" {
  name                     = "${var.name_prefix}-analytics"
  network                  = google_compute_network.analytics.id
  region                   = var.region
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_5_SEC"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Dataproc nodes talk to each other on every port (YARN, HDFS, Spark shuffle): allowed between
# instances running as the Dataproc service account only.
resource "google_compute_firewall" "dataproc_internal" {
  name                    = "${var.name_prefix}-dataproc-internal"
  network                 = google_compute_network.analytics.id
  direction               = "INGRESS"
  source_service_accounts = [google_service_account.dataproc.email]
  target_service_accounts = [google_service_account.dataproc.email]

  allow {
    protocol = "tcp"
  }
  allow {
    protocol = "udp"
  }
  allow {
    protocol = "icmp"
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_router" "analytics" {
  name    = "${var.name_prefix}-analytics"
  network = google_compute_network.analytics.id
  region  = var.region
}

resource "google_compute_router_nat" "analytics" {
  name                               = "${var.name_prefix}-analytics"
  router                             = google_compute_router.analytics.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                    = google_compute_subnetwork.analytics.id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}
