//! Who is calling: a customer, an administrator, or anyone at all when access control is off
//! (`auth.mode = "open"`). Handlers ask a [`Caller`] the two questions access control needs:
//! may this caller see a resource owned by X, and on whose behalf does it act.

use uuid::Uuid;

use crate::problem::Problem;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Role> {
        match raw {
            "customer" => Some(Role::Customer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    /// Access control is off: every caller may do everything. A valid token still says who
    /// the caller is (for `/users/me`), but restricts nothing.
    Open {
        user: Option<Uuid>,
    },
    User {
        id: Uuid,
        role: Role,
    },
}

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(Identity);

impl Caller {
    pub fn user(id: Uuid, role: Role) -> Caller {
        Caller(Identity::User { id, role })
    }

    /// A caller in open mode, anonymous or known by a token.
    pub fn open(user: Option<Uuid>) -> Caller {
        Caller(Identity::Open { user })
    }

    pub fn is_open(&self) -> bool {
        matches!(self.0, Identity::Open { .. })
    }

    /// Administrators, and everyone in open mode.
    pub fn is_admin(&self) -> bool {
        match self.0 {
            Identity::Open { .. } => true,
            Identity::User { role, .. } => role == Role::Admin,
        }
    }

    /// The signed-in user, if the caller is known.
    pub fn user_id(&self) -> Option<Uuid> {
        match self.0 {
            Identity::Open { user } => user,
            Identity::User { id, .. } => Some(id),
        }
    }

    /// Whether the caller may see or act on something `owner` owns: its owner and
    /// administrators may. Callers who may not get the resource's 404, so ids cannot be probed.
    pub fn may_access(&self, owner: Uuid) -> bool {
        self.is_admin() || self.user_id() == Some(owner)
    }

    /// The user a request acts for. A customer acts for themselves: naming somebody else is
    /// 403. An administrator may act for anyone (an operator placing an order for a customer),
    /// themselves by default. In open mode the request must name the user, as the seed's
    /// clients do.
    pub fn acting_for(&self, named: Option<Uuid>, field: &str) -> Result<Uuid, Problem> {
        match (&self.0, named) {
            (Identity::Open { .. }, Some(named)) => Ok(named),
            (Identity::Open { user: Some(user) }, None) => Ok(*user),
            (Identity::Open { user: None }, None) => Err(Problem::invalid(format!(
                "{field} is required (access control is off, so it cannot come from a token)"
            ))
            .with("field", field.to_owned())),
            (Identity::User { id, .. }, None) => Ok(*id),
            (Identity::User { id, .. }, Some(named)) if named == *id => Ok(named),
            (
                Identity::User {
                    role: Role::Admin, ..
                },
                Some(named),
            ) => Ok(named),
            (Identity::User { .. }, Some(_)) => Err(super::forbidden(&format!(
                "{field} must be your own user id"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_admins_may_access_and_act() {
        let (ada, bob) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let customer = Caller::user(ada, Role::Customer);
        let admin = Caller::user(bob, Role::Admin);
        assert!(customer.may_access(ada));
        assert!(!customer.may_access(bob));
        assert!(admin.may_access(ada));
        assert!(Caller::open(None).may_access(ada));

        assert_eq!(customer.acting_for(None, "user_id").unwrap(), ada);
        assert_eq!(customer.acting_for(Some(ada), "user_id").unwrap(), ada);
        assert_eq!(
            customer
                .acting_for(Some(bob), "user_id")
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(admin.acting_for(Some(ada), "user_id").unwrap(), ada);
        assert_eq!(admin.acting_for(None, "user_id").unwrap(), bob);
        let open = Caller::open(None);
        assert_eq!(open.acting_for(Some(ada), "user_id").unwrap(), ada);
        assert_eq!(open.acting_for(None, "user_id").unwrap_err().status, 422);
        assert_eq!(
            Caller::open(Some(bob)).acting_for(None, "user_id").unwrap(),
            bob
        );
    }
}
