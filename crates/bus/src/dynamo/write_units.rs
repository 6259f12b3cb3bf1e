//! DynamoDB's write units, worked out from what each request writes by the service's published
//! sizing rules: an on-demand table bills one write request unit per started KB of each item
//! written, at least one, and twice that inside a transaction. This is the figure a cloud bill
//! charges, and the one no local emulator gives: moto's `ConsumedCapacity` does not follow
//! these rules (docs/benchmarks.md). Counted in `dynamodb_write_units_total{operation}`.
//!
//! A put carries its item, so its size is exact. An update, a delete or a transaction's
//! condition check names only a key: each counts one unit, which is exact while the stored item
//! is under 1 KB (DynamoDB bills the larger of the item before and after). Everything this
//! platform updates or deletes is: outbox rows and counter shards, whose puts are measured
//! here too (`dynamodb_cost.rs` holds the transaction that puts them to one unit an item).

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemInput;
use aws_sdk_dynamodb::operation::put_item::PutItemInput;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsInput;
use aws_sdk_dynamodb::types::AttributeValue;

/// Bytes DynamoDB counts for an item: each attribute's name plus its value.
pub fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number_size(n),
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(set) => set.iter().map(String::len).sum(),
        AttributeValue::Ns(set) => set.iter().map(|n| number_size(n)).sum(),
        AttributeValue::Bs(set) => set.iter().map(|b| b.as_ref().len()).sum(),
        // 3 bytes for the document, 1 a member, then the member (and a map's key).
        AttributeValue::L(list) => 3 + list.iter().map(|v| 1 + value_size(v)).sum::<usize>(),
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(k, v)| 1 + k.len() + value_size(v))
                .sum::<usize>()
        }
        // A kind of value newer than this SDK: nothing to count it by.
        _ => 0,
    }
}

/// A number: one byte per two significant digits, plus one.
fn number_size(n: &str) -> usize {
    let mantissa = n.split(['e', 'E']).next().unwrap_or("");
    let digits = || mantissa.bytes().filter(u8::is_ascii_digit);
    // Significant: from the first non-zero digit to the last.
    let leading = digits().take_while(|d| *d == b'0').count();
    let trailing = digits().rev().take_while(|d| *d == b'0').count();
    let significant = digits().count().saturating_sub(leading + trailing);
    significant.max(1).div_ceil(2) + 1
}

/// Units to write one item of `bytes`: one per started KB, at least one.
pub fn units(bytes: usize) -> u64 {
    u64::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u64::MAX)
}

fn put_units(item: Option<&HashMap<String, AttributeValue>>) -> u64 {
    item.map_or(1, |item| units(item_size(item)))
}

/// A `PutItem`'s units.
pub fn of_put(put: &PutItemInput) -> u64 {
    put_units(put.item())
}

/// A `BatchWriteItem`'s units: each put by its item, each delete one.
pub fn of_batch(batch: &BatchWriteItemInput) -> u64 {
    batch
        .request_items()
        .into_iter()
        .flat_map(|tables| tables.values().flatten())
        .map(|request| match request.put_request() {
            Some(put) => put_units(Some(put.item())),
            None => 1,
        })
        .sum()
}

/// A `TransactWriteItems`'s units: each item as written alone, twice.
pub fn of_transaction(transaction: &TransactWriteItemsInput) -> u64 {
    let units: u64 = transaction
        .transact_items()
        .iter()
        .map(|item| match item.put() {
            Some(put) => put_units(Some(put.item())),
            // An update, a delete or a condition check.
            None => 1,
        })
        .sum();
    2 * units
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.into())
    }

    #[test]
    fn an_item_is_its_names_and_values_in_bytes() {
        // "pk" 2 + "outbox" 6, "n" 1 + 12345 (5 significant digits: 3 + 1), "ok" 2 + 1.
        let item = HashMap::from([
            ("pk".to_owned(), s("outbox")),
            ("n".to_owned(), AttributeValue::N("12345".into())),
            ("ok".to_owned(), AttributeValue::Bool(true)),
        ]);
        assert_eq!(item_size(&item), 8 + 5 + 3);
        // Trailing and leading zeroes are not significant.
        assert_eq!(number_size("1000"), 2);
        assert_eq!(number_size("0.5"), 2);
        // A list: 3 + one byte a member + the member.
        assert_eq!(
            value_size(&AttributeValue::L(vec![s("ab"), s("c")])),
            3 + 3 + 2
        );
    }

    #[test]
    fn a_unit_a_started_kilobyte_twice_in_a_transaction() {
        assert_eq!(
            (units(0), units(1024), units(1025), units(4096)),
            (1, 1, 2, 4)
        );
        let big = HashMap::from([("payload".to_owned(), s(&"x".repeat(1_500)))]);
        let small = HashMap::from([("pk".to_owned(), s("k"))]);
        let put = |item: &HashMap<String, AttributeValue>| {
            aws_sdk_dynamodb::types::Put::builder()
                .table_name("t")
                .set_item(Some(item.clone()))
                .build()
                .unwrap()
        };
        let transaction = TransactWriteItemsInput::builder()
            .transact_items(
                aws_sdk_dynamodb::types::TransactWriteItem::builder()
                    .put(put(&big))
                    .build(),
            )
            .transact_items(
                aws_sdk_dynamodb::types::TransactWriteItem::builder()
                    .put(put(&small))
                    .build(),
            )
            .build()
            .unwrap();
        assert_eq!(of_transaction(&transaction), 2 * (2 + 1));
        let put_item = PutItemInput::builder()
            .table_name("t")
            .set_item(Some(big))
            .build()
            .unwrap();
        assert_eq!(of_put(&put_item), 2);
        let deletes = BatchWriteItemInput::builder()
            .request_items(
                "t",
                vec![
                    aws_sdk_dynamodb::types::WriteRequest::builder()
                        .delete_request(
                            aws_sdk_dynamodb::types::DeleteRequest::builder()
                                .set_key(Some(small.clone()))
                                .build()
                                .unwrap(),
                        )
                        .build();
                    3
                ],
            )
            .build()
            .unwrap();
        assert_eq!(of_batch(&deletes), 3);
    }
}
