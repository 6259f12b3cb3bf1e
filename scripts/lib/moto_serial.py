"""A moto server that serves one request at a time: `python moto_serial.py PORT`.

For DynamoDB. moto's TransactWriteItems snapshots the tables it touches and restores the whole
snapshot when a condition fails, so on the threaded server concurrent transactions undo each
other's commits (lost refunds, two successes for one order); serialised, each request is atomic
as on DynamoDB. SQS stays on a threaded server: its long polls would block this one.
Used by scripts/check-aws and scripts/cloud-like.
"""
import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

run_simple("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False)
