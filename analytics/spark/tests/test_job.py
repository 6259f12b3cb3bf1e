"""The job's pure parts: settings, Kafka options, secrets, rounding. No JVM."""

import io
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import job  # noqa: E402


class Durations(unittest.TestCase):
    def test_spark_style_durations(self):
        self.assertEqual(job.duration_seconds("1 minute"), 60)
        self.assertEqual(job.duration_seconds("30 seconds"), 30)
        self.assertEqual(job.duration_seconds("90s"), 90)
        self.assertEqual(job.duration_seconds("2 hours"), 7200)
        for bad in ("", "minute", "0 seconds", "1 fortnight", "-5 seconds"):
            with self.assertRaises(job.ConfigError, msg=bad):
                job.duration_seconds(bad)

    def test_window_type_is_the_seeds_label(self):
        self.assertEqual(job.window_type("1 minute"), "tumbling_1m")
        self.assertEqual(job.window_type("5 minutes"), "tumbling_5m")
        self.assertEqual(job.window_type("90 seconds"), "tumbling_90s")


class KafkaOptions(unittest.TestCase):
    def test_sasl_ssl_plain_as_the_seed(self):
        o = job.kafka_options("b:9092", "SASL_SSL", "PLAIN", "KEY", "SEC")
        self.assertEqual(o["kafka.bootstrap.servers"], "b:9092")
        self.assertEqual(o["kafka.security.protocol"], "SASL_SSL")
        self.assertEqual(o["kafka.sasl.mechanism"], "PLAIN")
        self.assertEqual(
            o["kafka.sasl.jaas.config"],
            'org.apache.kafka.common.security.plain.PlainLoginModule required username="KEY" password="SEC";',
        )

    def test_quotes_in_secrets_cannot_break_the_jaas_line(self):
        o = job.kafka_options("b:9092", "sasl_ssl", "plain", 'k"ey', "s\\e")
        self.assertIn('username="k\\"ey" password="s\\\\e";', o["kafka.sasl.jaas.config"])

    def test_plaintext_needs_no_credentials(self):
        self.assertEqual(
            job.kafka_options("localhost:9092", "PLAINTEXT", "PLAIN", None, None),
            {"kafka.bootstrap.servers": "localhost:9092", "kafka.security.protocol": "PLAINTEXT"},
        )

    def test_connector_coordinate(self):
        self.assertEqual(job.kafka_package("3.5.1"), "org.apache.spark:spark-sql-kafka-0-10_2.12:3.5.1")
        self.assertEqual(job.kafka_package("3.5.1", "2.13"), "org.apache.spark:spark-sql-kafka-0-10_2.13:3.5.1")

    def test_missing_settings_are_named(self):
        with self.assertRaisesRegex(job.ConfigError, "KAFKA_BOOTSTRAP_SERVERS"):
            job.kafka_options(None, "SASL_SSL", "PLAIN", "k", "s")
        with self.assertRaisesRegex(job.ConfigError, "KAFKA_API_KEY and KAFKA_API_SECRET"):
            job.kafka_options("b:9092", "SASL_SSL", "PLAIN", "k", None)
        with self.assertRaisesRegex(job.ConfigError, "KAFKA_SASL_MECHANISM"):
            job.kafka_options("b:9092", "SASL_SSL", "GSSAPI", "k", "s")


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Secrets(unittest.TestCase):
    def test_secret_manager_through_the_metadata_server(self):
        seen = []

        def urlopen(req):
            seen.append((req.full_url, dict(req.header_items())))
            if "metadata.google.internal" in req.full_url:
                return FakeResponse(json.dumps({"access_token": "tok"}).encode())
            return FakeResponse(json.dumps({"payload": {"data": "czNjcjN0"}}).encode())

        self.assertEqual(job.access_secret("projects/p/secrets/kafka-api-secret", urlopen), "s3cr3t")
        self.assertEqual(seen[0][1].get("Metadata-flavor"), "Google")
        self.assertEqual(
            seen[1][0],
            "https://secretmanager.googleapis.com/v1/projects/p/secrets/kafka-api-secret/versions/latest:access",
        )
        self.assertEqual(seen[1][1].get("Authorization"), "Bearer tok")

    def test_secret_names(self):
        self.assertEqual(job.secret_version_name("projects/p/secrets/s/versions/3"), "projects/p/secrets/s/versions/3")
        with self.assertRaises(job.ConfigError):
            job.secret_version_name("kafka-api-key")

    def test_environment_wins_over_secret_manager(self):
        args = job.parse_args(["--checkpoint", "c", "--kafka-api-key-secret", "projects/p/secrets/k",
                               "--kafka-api-secret-secret", "projects/p/secrets/s"], env={})
        fetched = []
        fetch = lambda name: fetched.append(name) or "from-" + name.rsplit("/", 1)[1]  # noqa: E731
        self.assertEqual(job.resolve_credentials(args, {"KAFKA_API_KEY": "envkey"}, fetch), ("envkey", "from-s"))
        self.assertEqual(fetched, ["projects/p/secrets/s"])


class Arguments(unittest.TestCase):
    def test_file_runs(self):
        a = job.parse_args(["--source", "file", "--input", "e.jsonl", "--output", "out/"], env={})
        self.assertTrue(a.trigger_once)
        self.assertEqual(a.checkpoint, "out/_checkpoint")
        self.assertEqual((a.window, a.watermark, a.results_topic), ("1 minute", "30 seconds", ""))
        with self.assertRaisesRegex(job.ConfigError, "--input"):
            job.parse_args(["--source", "file", "--output", "o"], env={})

    def test_kafka_runs_from_the_seeds_environment(self):
        env = {"KAFKA_BOOTSTRAP_SERVERS": "pkc:9092", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}
        a = job.parse_args(["--checkpoint", "gs://b/cp", "--output", "gs://b/w"], env=env)
        self.assertEqual((a.source, a.topic, a.results_topic), ("kafka", "orders", "analytics-results"))
        self.assertEqual(a.bootstrap_servers, "pkc:9092")
        self.assertFalse(a.trigger_once)
        with self.assertRaisesRegex(job.ConfigError, "--checkpoint"):
            job.parse_args(["--output", "gs://b/w"], env=env)

    def test_bad_values(self):
        for argv in (["--source", "file", "--input", "i", "--output", "o", "--window", "soon"],
                     ["--source", "file", "--input", "i", "--output", "o", "--rsd", "0.5"],
                     ["--source", "file", "--input", "i", "--output", "o", "--conf", "novalue"]):
            with self.assertRaises(job.ConfigError, msg=argv):
                job.parse_args(argv, env={})


class Rounding(unittest.TestCase):
    def test_half_even_to_the_cent(self):
        self.assertEqual(job.half_even_cents(1000, 3), 333)
        self.assertEqual(job.half_even_cents(3001, 2), 1500)  # 1500.5 -> even
        self.assertEqual(job.half_even_cents(3003, 2), 1502)  # 1501.5 -> even
        self.assertEqual(job.half_even_cents(2003, 2), 1002)  # 1001.5 -> 1002
        self.assertEqual(job.half_even_cents(5, 0), 0)

    def test_single_file_glob(self):
        self.assertEqual(job.single_file_glob("file:/tmp/x/e.jsonl"), "file:/tmp/x/{e.jsonl}")


if __name__ == "__main__":
    unittest.main()
