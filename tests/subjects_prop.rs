//! Property: no worker message, however hostile, and no accepted name produce an invalid or
//! wildcard subject, or a subject with extra tokens.

use flotilla::protocol::message::{Classified, classify};
use flotilla::protocol::subjects::{AppKey, MsgType, Parsed, Subjects, is_publishable, kind};
use proptest::prelude::*;

fn subject_for(s: &Subjects, app: &AppKey, line: &[u8]) -> Option<String> {
    match classify(line).ok()? {
        Classified::Typed { ty, .. } => Some(s.app(app, ty)),
        Classified::Raw { .. } => Some(s.process_msg(app)),
        Classified::NodeInternal { .. } => None,
    }
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z.*> \\t\\n:_-]{0,12}",
        Just(">".to_string()),
        Just("*".to_string()),
        Just("a.b".to_string()),
        Just("".to_string()),
        Just("$SYS".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_type_any_data_gives_a_valid_subject(
        ns in hostile_string(), name in hostile_string(),
        ty in hostile_string(), data in any::<Option<i64>>(), extra in any::<String>(),
    ) {
        let s = Subjects::new("pm").unwrap();
        let Ok(app) = AppKey::new(&ns, &name) else { return Ok(()) };
        let msg = serde_json::json!({"type": ty, "data": data, "extra": extra});
        let line = serde_json::to_vec(&msg).unwrap();
        if let Some(subject) = subject_for(&s, &app, &line) {
            prop_assert!(is_publishable(&subject), "{subject}");
            prop_assert_eq!(subject.split('.').count(), 4, "{}", subject);
            match s.parse(&subject) {
                Some(Parsed::App { namespace, name: n, kind: k }) => {
                    prop_assert_eq!(namespace, app.namespace());
                    prop_assert_eq!(n, app.name());
                    prop_assert!(k == kind::PROCESS_MSG || MsgType::new(k).is_some());
                }
                other => prop_assert!(false, "did not round-trip: {:?}", other),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_make_bad_subjects(line in proptest::collection::vec(any::<u8>(), 0..300)) {
        let s = Subjects::new("pm").unwrap();
        let app = AppKey::new("default", "api").unwrap();
        if let Some(subject) = subject_for(&s, &app, &line) {
            prop_assert!(is_publishable(&subject));
            prop_assert!(s.parse(&subject).is_some());
        }
    }

    #[test]
    fn names_are_accepted_only_when_they_are_single_tokens(name in hostile_string()) {
        if AppKey::new("default", &name).is_ok() {
            prop_assert!(!name.is_empty());
            prop_assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
        }
    }
}
