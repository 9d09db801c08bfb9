use super::*;

fn pattern(p: &str) -> JobPattern {
    JobPattern::parse(p).unwrap()
}

#[test]
fn patterns_match_literal_runs_around_stars() {
    let cases = [
        ("team-a/*", "team-a/llm-70b", true),
        ("team-a/*", "team-a/", true),
        ("team-a/*", "team-b/llm", false),
        ("team-a/*", "xteam-a/llm", false),
        ("*", "anything/at/all", true),
        ("*-70b", "team-a/llm-70b", true),
        ("*-70b", "team-a/llm-70bx", false),
        ("team-*/run-*", "team-a/run-3", true),
        ("team-*/run-*", "team-a/job-3", false),
        ("a*a", "a", false),
        ("a*a", "aa", true),
        ("exact", "exact", true),
        ("exact", "exactly", false),
        ("a*b*c", "abbc", true),
        ("a*b*c", "acb", false),
    ];
    for (p, job, want) in cases {
        assert_eq!(pattern(p).matches(job), want, "{p:?} against {job:?}");
    }
}

#[test]
fn patterns_become_globs_that_escape_sqlite_specials() {
    assert_eq!(pattern("team-a/*").to_glob(), "team-a/*");
    assert_eq!(pattern("odd?[x]*").to_glob(), "odd[?][[]x]*");
}

#[test]
fn bad_patterns_and_scopes_are_refused_naming_them() {
    for (scope, says) in [
        ("ingest:", "empty"),
        ("query:a b", "' '"),
        ("write:team-a/*", "unknown kind \"write\""),
        ("adminx", "is not `admin`"),
        ("query:a**", "`**`"),
    ] {
        let e = Scope::parse(scope).unwrap_err();
        assert!(e.contains(says), "{scope}: {e}");
    }
}

const TWO: &str = r#"
[[principal]]
name = "team-a-trainers"
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
scopes = ["ingest:team-a/*", "query:team-a/*"]

[[principal]]
name = "ops"
client_cert_name = "ops.example.internal"
scopes = ["admin"]
"#;

#[test]
fn principals_are_found_by_token_or_certificate_name() {
    let p = Principals::parse(TWO, "auth.toml").unwrap();
    assert_eq!(p.len(), 2);
    // "test" is the token whose SHA-256 is above.
    assert_eq!(
        sha256_hex("test"),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
    let team = p.by_token("test").expect("the token's principal");
    assert_eq!(&*team.name, "team-a-trainers");
    assert!(team.may_ingest("team-a/llm") && team.may_query("team-a/llm"));
    assert!(!team.may_ingest("team-b/llm") && !team.may_query("team-b/llm"));
    assert_eq!(
        team.query_patterns()
            .unwrap()
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>(),
        ["team-a/*"]
    );
    assert!(p.by_token("tes").is_none() && p.by_token("").is_none());
    let ops = p.by_cert_names(&["x".into(), "ops.example.internal".into()]).unwrap();
    assert!(ops.is_admin() && ops.may_ingest("any") && ops.query_patterns().is_none());
    assert!(p.by_cert_names(&["team-a-trainers".into()]).is_none());
}

#[test]
fn a_bad_auth_file_is_refused_naming_the_line() {
    let cases = [
        (
            "[[principal]]\nname = \"a\"\ntoken_sha256 = \"00\"\nscopes = [\"admin\"]\n",
            "auth.toml:3: principal \"a\": token_sha256 \"00\" is not 64 hex digits",
        ),
        (
            &format!(
                "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nscopes = [\"admin\"]\n\n[[principal]]\nname = \"a\"\nclient_cert_name = \"x\"\nscopes = [\"admin\"]\n",
                sha256_hex("t")
            ),
            "auth.toml:7: principal name \"a\" is used twice (first at line 1)",
        ),
        (
            "[[principal]]\nname = \"a\"\nclient_cert_name = \"x\"\nscopes = [\"admin\", \"query:\"]\n",
            "auth.toml:4: principal \"a\": scope \"query:\": the job pattern is empty",
        ),
        (
            "[[principal]]\nname = \"a\"\nscopes = [\"admin\"]\n",
            "auth.toml:1: principal \"a\" has neither token_sha256 nor client_cert_name",
        ),
        (
            "[[principal]]\nname = \"a\"\nclient_cert_name = \"x\"\nscopes = []\n",
            "auth.toml:4: principal \"a\" has no scopes",
        ),
        ("", "auth.toml: no [[principal]]"),
    ];
    for (text, want) in cases {
        let e = Principals::parse(text, "auth.toml").unwrap_err().to_string();
        assert!(e.starts_with(want), "got {e:?}, want {want:?}");
    }
    let e = Principals::parse("[[principal]]\nname = \"a\"\ntoken = \"x\"\n", "auth.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("token"), "{e}");
}

#[test]
fn two_principals_cannot_share_a_token_or_a_certificate_name() {
    let hash = sha256_hex("t");
    let text = format!(
        "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"admin\"]\n[[principal]]\nname = \"b\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"admin\"]\n"
    );
    let e = Principals::parse(&text, "f").unwrap_err().to_string();
    assert!(
        e.starts_with("f:7: principal \"b\": token_sha256 is also principal \"a\"'s"),
        "{e}"
    );
    let text = "[[principal]]\nname = \"a\"\nclient_cert_name = \"x\"\nscopes = [\"admin\"]\n[[principal]]\nname = \"b\"\nclient_cert_name = \"x\"\nscopes = [\"admin\"]\n";
    let e = Principals::parse(text, "f").unwrap_err().to_string();
    assert!(
        e.starts_with("f:7: principal \"b\": client_cert_name \"x\" is also"),
        "{e}"
    );
}
