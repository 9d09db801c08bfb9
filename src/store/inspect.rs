//! Looking at an existing database file before anything writes to it.
//!
//! SQLite changes a file by merely opening it for writing: switching it to
//! WAL rewrites its header, and a WAL-mode file gets `-wal` and `-shm` files
//! beside it. So whatever is at `gradguard.db` is inspected read-only first:
//! its first bytes by hand (a file that is not SQLite's never reaches SQLite),
//! then its schema version and tables through a read-only connection. Only a
//! gradguard store, or no file, is then opened for writing.

use std::io::Read;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::{SCHEMA_VERSION, StoreError, configure, corrupt_or};

/// What the database file of a data directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// No file, or an empty one: a store is made there.
    Nothing,
    /// A gradguard store of this schema version (0: an SQLite file without
    /// any table yet).
    Store { version: i64 },
}

/// The first bytes of every SQLite database file.
const MAGIC: &[u8] = b"SQLite format 3\0";

/// The tables every gradguard store has had since schema version 1.
const OUR_TABLES: [&str; 4] = ["jobs", "anomalies", "advice", "acks"];

/// Says what the file at `path` is, reading it only. Nothing is written to
/// it, and nothing is made beside it unless it already has a `-wal` or
/// `-journal` file (left by a crash, or open in another program): SQLite's
/// read-only open then reads those, and may add the `-shm` index a `-wal`
/// needs. `thorough` also runs SQLite's `quick_check`, which reads every page.
pub(super) fn inspect(path: &Path, thorough: bool) -> Result<Found, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let io = |source| StoreError::Dir {
        path: path.to_owned(),
        source,
    };
    let mut head = Vec::with_capacity(MAGIC.len());
    match std::fs::File::open(path) {
        Ok(file) => {
            file.take(MAGIC.len() as u64).read_to_end(&mut head).map_err(io)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => return Err(io(e)),
    }
    if head.is_empty() {
        return Ok(Found::Nothing);
    }
    if head != MAGIC {
        let size = std::fs::metadata(path).map_err(io)?.len();
        return Err(corrupt(format!(
            "it is not an SQLite database: its {size} bytes do not begin with SQLite's header"
        )));
    }
    // Without a -wal or -journal beside it, no connection has the file open
    // in WAL mode and no transaction was cut short: `immutable` reads it
    // without the locks and the -shm file a WAL-mode file otherwise needs.
    let beside = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        Path::new(&name).exists()
    };
    let quiet = !beside("-wal") && !beside("-journal");
    let uri = format!(
        "file:{}?mode=ro{}",
        uri_path(path),
        if quiet { "&immutable=1" } else { "" }
    );
    let conn = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| corrupt_or(path, e))?;
    configure(&conn).map_err(|e| corrupt_or(path, e))?;
    if thorough {
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| corrupt_or(path, e))?;
        if check != "ok" {
            return Err(corrupt(short(&check, 200)));
        }
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| corrupt_or(path, e))?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| corrupt_or(path, e))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Newer {
            path: path.to_owned(),
            found: version,
        });
    }
    let ours = OUR_TABLES.iter().all(|t| tables.iter().any(|n| n == t));
    match version {
        0 if tables.is_empty() => Ok(Found::Store { version }),
        1.. if ours => Ok(Found::Store { version }),
        0 => Err(corrupt(format!(
            "it is another program's SQLite database: it holds other tables ({})",
            listed(&tables)
        ))),
        _ => Err(corrupt(format!(
            "an SQLite database of schema version {version} without gradguard's tables (it holds {})",
            if tables.is_empty() {
                "none".to_owned()
            } else {
                listed(&tables)
            }
        ))),
    }
}

/// A few table names for a message: what a stranger's file holds is quoted
/// short, never whole.
fn listed(tables: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text: Vec<String> = tables
        .iter()
        .take(SHOWN)
        .map(|t| format!("{:?}", short(t, 40)))
        .collect();
    if tables.len() > SHOWN {
        text.push(format!("{} more", tables.len() - SHOWN));
    }
    text.join(", ")
}

/// At most `max` characters of `s`, with `…` when cut.
fn short(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

/// A path as the path of an SQLite `file:` URI: every byte but the plain
/// ones percent-encoded (`?`, `#` and `%` would otherwise mean something).
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_becomes_a_uri_path() {
        assert_eq!(uri_path(Path::new("/tmp/a b/x?y#z%.db")), "/tmp/a%20b/x%3Fy%23z%25.db");
        assert_eq!(short("abcdef", 3), "abc…");
        let many: Vec<String> = (0..7).map(|i| format!("t{i}")).collect();
        assert_eq!(listed(&many), "\"t0\", \"t1\", \"t2\", \"t3\", \"t4\", 2 more");
    }
}
