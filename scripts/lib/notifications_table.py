"""Creates the notifier's DynamoDB table (`NOTIFICATIONS_TABLE`, default `notifications`) as
deploy/terraform/aws/notifier declares it, on the server `AWS_ENDPOINT_URL` names (moto in the
scripts): key `event_id`, and the two GSIs the API reads by user and by order.

    python notifications_table.py      (with boto3, from the moto virtualenv)
"""

import os

import boto3

boto3.client("dynamodb").create_table(
    TableName=os.environ.get("NOTIFICATIONS_TABLE", "notifications"),
    BillingMode="PAY_PER_REQUEST",
    AttributeDefinitions=[
        {"AttributeName": n, "AttributeType": "S"}
        for n in ("event_id", "user_id", "order_id", "created_sort")
    ],
    KeySchema=[{"AttributeName": "event_id", "KeyType": "HASH"}],
    GlobalSecondaryIndexes=[
        {
            "IndexName": f"{k}-created_at",
            "Projection": {"ProjectionType": "ALL"},
            "KeySchema": [
                {"AttributeName": k, "KeyType": "HASH"},
                {"AttributeName": "created_sort", "KeyType": "RANGE"},
            ],
        }
        for k in ("user_id", "order_id")
    ],
)
