//! The cart, kept in the visitor's browser as a cookie (`product:quantity|...`): no server
//! state for people who only browse, it survives signing in, and tampering with it changes only
//! one's own cart (prices and stock are the API's, read again at checkout).

use uuid::Uuid;

/// The most lines a cart holds, and units of one product: the cookie stays small.
pub const MAX_LINES: usize = 20;
pub const MAX_QUANTITY: i64 = 99;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cart {
    lines: Vec<(Uuid, i64)>,
}

impl Cart {
    /// The cart a cookie holds; anything unreadable in it is dropped, never an error.
    pub fn from_cookie(value: &str) -> Cart {
        let mut cart = Cart::default();
        for entry in value.split('|').take(MAX_LINES) {
            let Some((id, quantity)) = entry.split_once(':') else {
                continue;
            };
            if let (Ok(id), Ok(quantity)) = (id.parse::<Uuid>(), quantity.parse::<i64>()) {
                cart.set(id, quantity);
            }
        }
        cart
    }

    pub fn to_cookie(&self) -> String {
        self.lines
            .iter()
            .map(|(id, quantity)| format!("{}:{quantity}", id.simple()))
            .collect::<Vec<_>>()
            .join("|")
    }

    pub fn lines(&self) -> &[(Uuid, i64)] {
        &self.lines
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Units in the cart.
    pub fn count(&self) -> i64 {
        self.lines.iter().map(|(_, q)| q).sum()
    }

    /// Adds units of a product (up to [`MAX_QUANTITY`]); false when the cart is full.
    pub fn add(&mut self, id: Uuid, quantity: i64) -> bool {
        let current = self
            .lines
            .iter()
            .find(|(p, _)| *p == id)
            .map_or(0, |(_, q)| *q);
        if current == 0 && self.lines.len() >= MAX_LINES {
            return false;
        }
        self.set(id, current.saturating_add(quantity.max(0)));
        true
    }

    /// Sets a product's quantity: 0 (or less) removes it, more than [`MAX_QUANTITY`] is capped.
    pub fn set(&mut self, id: Uuid, quantity: i64) {
        let quantity = quantity.min(MAX_QUANTITY);
        match self.lines.iter().position(|(p, _)| *p == id) {
            Some(at) if quantity <= 0 => {
                self.lines.remove(at);
            }
            Some(at) => self.lines[at].1 = quantity,
            None if quantity > 0 && self.lines.len() < MAX_LINES => self.lines.push((id, quantity)),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cart_reads_back_what_it_wrote_and_drops_garbage() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut cart = Cart::default();
        assert!(cart.add(a, 2));
        assert!(cart.add(b, 1));
        assert!(cart.add(a, 1));
        assert_eq!(cart.lines(), &[(a, 3), (b, 1)]);
        assert_eq!(Cart::from_cookie(&cart.to_cookie()), cart);
        let cookie = format!(
            "{}|junk|{}:x|{}:500",
            cart.to_cookie(),
            a.simple(),
            b.simple()
        );
        let read = Cart::from_cookie(&cookie);
        assert_eq!(read.lines(), &[(a, 3), (b, MAX_QUANTITY)]);
        assert_eq!(read.count(), 3 + MAX_QUANTITY);
    }

    #[test]
    fn quantities_are_bounded_and_zero_removes() {
        let id = Uuid::new_v4();
        let mut cart = Cart::default();
        cart.set(id, 1_000);
        assert_eq!(cart.lines(), &[(id, MAX_QUANTITY)]);
        cart.set(id, 0);
        assert!(cart.is_empty());
        cart.set(id, -3);
        assert!(cart.is_empty());
        for _ in 0..MAX_LINES {
            assert!(cart.add(Uuid::new_v4(), 1));
        }
        assert!(!cart.add(Uuid::new_v4(), 1));
        assert_eq!(cart.lines().len(), MAX_LINES);
    }
}
