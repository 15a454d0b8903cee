//! Certificate → facts → mapping values → the one LDAP filter: any DER either is refused as
//! unreadable or yields a filter that is well formed (balanced parentheses, printable ASCII:
//! every special or non-ASCII byte escaped), whatever the subject and SAN fields hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seg::config::{Enforcement, MappingConfig};
use seg::identity::{decide, CertFacts, MappingPlan, MappingRule};

fuzz_target!(|data: &[u8]| {
    let Ok(facts) = CertFacts::from_der(data) else {
        return;
    };
    let mapping = MappingConfig {
        rules: MappingRule::ALL.to_vec(),
        enforcement: Enforcement::Full,
        many_to_one: vec![],
    };
    let plan = MappingPlan::new(&facts, &mapping);
    if !plan.lookup.is_empty() {
        let filter = plan.lookup.filter();
        assert!(
            filter.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "unescaped byte in {filter:?}"
        );
        let mut depth = 0i32;
        for b in filter.bytes() {
            match b {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "unbalanced {filter:?}");
        }
        assert_eq!(depth, 0, "unbalanced {filter:?}");
    }
    // No directory entry: never admitted.
    let verdict = decide(&facts, &plan, &[], Enforcement::Full);
    assert!(verdict.outcome.is_err());
});
