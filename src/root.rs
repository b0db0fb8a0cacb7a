//! Finding, creating and checking a root directory.
//!
//! A root is taken from `--root DIR`, else `SHOAL_ROOT`, else `MESSAGE_BASE_DIR` (the bash bus's
//! variable), else `/dev/shm/shoal-<uid>` ([`resolve`]). It is created mode 0700, whatever the
//! umask; an existing root that is a symlink or belongs to another user is refused; a root whose
//! marker names an unknown or newer format is refused rather than misread; a root that is not on
//! tmpfs is accepted with a warning.
//!
//! # The version marker
//!
//! `<root>/.shoal-format` is a JSON object written once, when the root is created:
//!
//! ```text
//! {"format":"shoal","version":1,"layout":"jsonl","shards":8,"quota_msgs":100000,"quota_bytes":67108864,"max_payload":1048576}
//! ```
//!
//! `format` and `version` say how to read everything else; `layout` is `jsonl` or `compat`;
//! the other keys are the root's defaults (inbox shards, inbox quota, payload cap). Missing
//! settings take their defaults; unknown keys are ignored.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::envelope::DEFAULT_MAX_PAYLOAD;
use crate::layout::{Layout, LayoutKind};

/// The on-disk format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Default number of shard files per inbox.
pub const DEFAULT_SHARDS: u32 = 8;
/// Most shards an inbox may have (the meta table has room for this many).
pub const MAX_SHARDS: u32 = 32;
/// Default inbox quota in unconsumed messages.
pub const DEFAULT_QUOTA_MSGS: u64 = 100_000;
/// Default inbox quota in unconsumed bytes (64 MiB).
pub const DEFAULT_QUOTA_BYTES: u64 = 64 << 20;

/// Root settings, stored in the marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootConfig {
    /// Always `"shoal"`.
    pub format: String,
    /// On-disk format version.
    pub version: u32,
    /// Inbox layout.
    pub layout: LayoutKind,
    /// Shard files per inbox, for agents created from now on.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Default quota: unconsumed messages per inbox.
    #[serde(default = "default_quota_msgs")]
    pub quota_msgs: u64,
    /// Default quota: unconsumed bytes per inbox.
    #[serde(default = "default_quota_bytes")]
    pub quota_bytes: u64,
    /// Default payload cap in bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
}

fn default_shards() -> u32 {
    DEFAULT_SHARDS
}
fn default_quota_msgs() -> u64 {
    DEFAULT_QUOTA_MSGS
}
fn default_quota_bytes() -> u64 {
    DEFAULT_QUOTA_BYTES
}
fn default_max_payload() -> usize {
    DEFAULT_MAX_PAYLOAD
}

impl RootConfig {
    /// Defaults for a new root of the given layout.
    pub fn new(layout: LayoutKind) -> RootConfig {
        RootConfig {
            format: "shoal".into(),
            version: FORMAT_VERSION,
            layout,
            shards: DEFAULT_SHARDS,
            quota_msgs: DEFAULT_QUOTA_MSGS,
            quota_bytes: DEFAULT_QUOTA_BYTES,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// Why a root cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The root path is a symbolic link.
    #[error("{}: the root is a symbolic link; refusing it (another user could have planted it)", .0.display())]
    Symlink(PathBuf),
    /// The root is owned by another user.
    #[error("{path}: the root is owned by uid {owner}, not by this user (uid {uid}); refusing it", path = .path.display())]
    ForeignOwner {
        /// The root.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// The root path exists and is not a directory.
    #[error("{}: exists and is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The root does not exist (for commands that do not create it).
    #[error("{}: no shoal root here (create agents with `shoal init <id>` first)", .0.display())]
    Missing(PathBuf),
    /// The directory holds other files but no shoal marker.
    #[error("{}: not a shoal root (no .shoal-format marker) and not empty; refusing to use it", .0.display())]
    NotAShoalRoot(PathBuf),
    /// The marker cannot be parsed or names another format.
    #[error("{path}: unknown root format ({detail}); refusing to read it", path = .path.display())]
    UnknownFormat {
        /// The marker file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The marker names a newer format version than this build reads.
    #[error("{path}: root format version {found} is newer than this shoal reads (version {FORMAT_VERSION}); upgrade shoal", path = .path.display())]
    NewerFormat {
        /// The marker file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The root exists with another layout than the one asked for.
    #[error("{path}: root holds the {found} layout, but {wanted} was asked for", path = .path.display())]
    LayoutMismatch {
        /// The root.
        path: PathBuf,
        /// Its layout.
        found: LayoutKind,
        /// The layout requested.
        wanted: LayoutKind,
    },
    /// Any other I/O error.
    #[error("{path}", path = .path.display())]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RootError + '_ {
    move |source| RootError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Pick the root directory: `cli` (from `--root`), else `SHOAL_ROOT`, else `MESSAGE_BASE_DIR`,
/// else `/dev/shm/shoal-<uid>`. Empty variables count as unset.
pub fn resolve(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_owned();
    }
    for var in ["SHOAL_ROOT", "MESSAGE_BASE_DIR"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return PathBuf::from(v);
        }
    }
    PathBuf::from(format!("/dev/shm/shoal-{}", crate::sys::euid()))
}

/// How to open a root.
#[derive(Debug, Clone, Default)]
pub struct RootOptions {
    /// Create the root, with this layout, if it does not exist.
    pub create: Option<LayoutKind>,
    /// Refuse an existing root that holds another layout.
    pub expect: Option<LayoutKind>,
    /// Take over a directory the bash `message-bus.sh` made (agent directories with `inbox/`,
    /// no marker) as a compat root, keeping its messages.
    pub adopt_bash_bus: bool,
}

/// An opened, checked root.
#[derive(Debug, Clone)]
pub struct Root {
    layout: Layout,
    config: RootConfig,
    warnings: Vec<String>,
}

impl Root {
    /// Open the root at `path`, creating it (and missing parents, mode 0700) with `layout`.
    ///
    /// # Errors
    /// [`RootError`]: a symlinked, foreign, non-directory or unknown-format root is refused.
    ///
    /// # Examples
    /// ```
    /// # let dir = std::path::PathBuf::from(format!("/dev/shm/shoal-doc-root-{}", std::process::id()));
    /// use shoal::{Root, LayoutKind};
    /// let root = Root::create(&dir, LayoutKind::Jsonl)?;
    /// assert_eq!(root.config().layout, LayoutKind::Jsonl);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create(path: &Path, layout: LayoutKind) -> Result<Root, RootError> {
        Root::open_with(
            path,
            &RootOptions {
                create: Some(layout),
                expect: Some(layout),
                adopt_bash_bus: false,
            },
        )
    }

    /// Open an existing root.
    ///
    /// # Errors
    /// [`RootError::Missing`] if there is none; otherwise as [`Root::create`].
    pub fn open(path: &Path) -> Result<Root, RootError> {
        Root::open_with(path, &RootOptions::default())
    }

    /// Open with explicit options.
    ///
    /// # Errors
    /// As [`Root::create`].
    pub fn open_with(path: &Path, opts: &RootOptions) -> Result<Root, RootError> {
        // `root/` would make lstat follow a symlink named `root`: drop trailing slashes and `.`.
        let normalized: PathBuf = path.components().collect();
        let path = normalized.as_path();
        let uid = crate::sys::euid();
        let mut warnings = Vec::new();
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if opts.create.is_none() {
                    return Err(RootError::Missing(path.to_owned()));
                }
                create_dir_0700(path)?;
                // A racing creator may have won; check what is there now.
                fs::symlink_metadata(path).map_err(io_at(path))?
            }
            Err(e) => return Err(io_at(path)(e)),
        };
        check_existing(path, &md, uid)?;
        let layout = Layout::new(path, LayoutKind::Jsonl); // marker paths only
        let config = match (read_marker(&layout)?, opts.create) {
            (Marker::Found(c), _) => c,
            (Marker::Foreign, _) if opts.adopt_bash_bus && looks_like_bash_bus(path) => {
                let config = write_marker(&layout, LayoutKind::Compat)?;
                tighten_tree(path).map_err(io_at(path))?;
                warnings.push(format!(
                    "{}: adopted the bash message bus's directory as a compat root; its messages are kept",
                    path.display()
                ));
                config
            }
            (Marker::Foreign, _) => match read_marker(&layout)? {
                // Another process adopted or created it between our two looks.
                Marker::Found(c) => c,
                _ => return Err(RootError::NotAShoalRoot(path.to_owned())),
            },
            (Marker::Empty, None) => return Err(RootError::Missing(path.to_owned())),
            (Marker::Empty, Some(kind)) => write_marker(&layout, kind)?,
        };
        if let Some(wanted) = opts.expect
            && wanted != config.layout
        {
            return Err(RootError::LayoutMismatch {
                path: path.to_owned(),
                found: config.layout,
                wanted,
            });
        }
        // Only now, with the marker accepted, is the directory known to be ours to tighten.
        tighten_mode(path, &md, &mut warnings)?;
        let layout = Layout::new(path, config.layout);
        // Checked when a command may create the root (init, init-system, ...), not on every
        // send: one statfs less per message for shell loops.
        let tmpfs = if opts.create.is_some() {
            crate::sys::is_tmpfs(path)
        } else {
            Ok(true)
        };
        match tmpfs {
            Ok(true) => {}
            Ok(false) => warnings.push(format!(
                "{}: not on tmpfs; shoal is designed for /dev/shm (flock and append semantics on \
                 other filesystems, NFS above all, differ)",
                path.display()
            )),
            Err(e) => warnings.push(format!("{}: cannot check filesystem: {e}", path.display())),
        }
        Ok(Root {
            layout,
            config,
            warnings,
        })
    }

    /// Path builder for this root.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The root directory.
    pub fn path(&self) -> &Path {
        self.layout.root()
    }

    /// Settings read from the marker.
    pub fn config(&self) -> &RootConfig {
        &self.config
    }

    /// Things the user should know (e.g. not on tmpfs); the CLI prints them on stderr.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

fn check_existing(path: &Path, md: &fs::Metadata, uid: u32) -> Result<(), RootError> {
    if md.file_type().is_symlink() {
        return Err(RootError::Symlink(path.to_owned()));
    }
    if !md.is_dir() {
        return Err(RootError::NotADirectory(path.to_owned()));
    }
    if md.uid() != uid {
        return Err(RootError::ForeignOwner {
            path: path.to_owned(),
            owner: md.uid(),
            uid,
        });
    }
    Ok(())
}

/// A root of ours that others can read (e.g. made by the bash bus with mode 755) is made 0700.
fn tighten_mode(
    path: &Path,
    md: &fs::Metadata,
    warnings: &mut Vec<String>,
) -> Result<(), RootError> {
    use std::os::unix::fs::PermissionsExt;
    if md.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_at(path))?;
        warnings.push(format!(
            "{}: root was mode {:o}, tightened to 700",
            path.display(),
            md.mode() & 0o777
        ));
    }
    Ok(())
}

/// `mkdir -p` with every created directory mode 0700, whatever the umask.
pub(crate) fn create_dir_0700(path: &Path) -> Result<(), RootError> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        create_dir_0700(parent)?;
    }
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {
            let d = File::open(path).map_err(io_at(path))?;
            crate::sys::set_mode(&d, 0o700).map_err(io_at(path))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// What a root directory holds.
enum Marker {
    Found(RootConfig),
    /// No marker, nothing else: a new root.
    Empty,
    /// No marker, other files.
    Foreign,
}

/// Whether `dir` is what the bash bus leaves: only agent directories (valid ids) holding
/// nothing but `inbox/`, `outbox/`, `.sequences/` and `processed/`, at least one with an inbox.
/// Entries shoal itself makes while adopting (`.shoal-format*`, `<id>/.shoal*`) are ignored, so
/// that processes adopting the same directory at once all see it as adoptable.
fn looks_like_bash_bus(dir: &Path) -> bool {
    const PARTS: [&str; 4] = ["inbox", "outbox", ".sequences", "processed"];
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let mut any_inbox = false;
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".shoal-format") {
            continue;
        }
        if crate::envelope::AgentId::new(&name).is_err() || !e.file_type().is_ok_and(|t| t.is_dir())
        {
            return false;
        }
        let Ok(parts) = fs::read_dir(e.path()) else {
            return false;
        };
        for p in parts.filter_map(Result::ok) {
            let p = p.file_name().to_string_lossy().into_owned();
            if p.starts_with(".shoal") {
                continue;
            }
            if !PARTS.contains(&p.as_str()) {
                return false;
            }
            any_inbox |= p == "inbox";
        }
    }
    any_inbox
}

/// Make an adopted bash bus private: directories 0700, files 0600 (it made them 755/644).
///
/// The marker is already linked, so other processes use the root while this walks it: they
/// adopt agent directories through `<id>/.shoal-staging-*`, renamed to `<id>/.shoal` or removed
/// a moment later, consume messages, remove agents. Shoal's own entries (`.shoal*`) are made
/// private when created and are not walked; anything else listed here and gone before it is
/// tightened or read has nothing left to make private.
fn tighten_tree(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        // Removed or renamed since its parent was listed: nothing left to tighten.
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for e in entries {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(".shoal") {
            continue;
        }
        let t = e.file_type()?;
        if t.is_symlink() {
            continue; // never follow a link planted in the tree
        }
        let mode = if t.is_dir() { 0o700 } else { 0o600 };
        match fs::set_permissions(e.path(), fs::Permissions::from_mode(mode)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue, // consumed meanwhile
            Err(err) => return Err(err),
        }
        if t.is_dir() {
            tighten_tree(&e.path())?;
        }
    }
    Ok(())
}

fn read_marker(layout: &Layout) -> Result<Marker, RootError> {
    let path = layout.marker();
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Empty, or holding only another creator's not-yet-linked marker: a new root.
            let others = fs::read_dir(layout.root())
                .map_err(io_at(layout.root()))?
                .filter_map(Result::ok)
                .any(|e| {
                    !e.file_name()
                        .to_string_lossy()
                        .starts_with(".shoal-format.tmp-")
                });
            return Ok(if others {
                Marker::Foreign
            } else {
                Marker::Empty
            });
        }
        Err(e) => return Err(io_at(&path)(e)),
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| RootError::UnknownFormat {
            path: path.clone(),
            detail: format!("marker is not JSON: {e}"),
        })?;
    if value.get("format").and_then(|f| f.as_str()) != Some("shoal") {
        return Err(RootError::UnknownFormat {
            path,
            detail: "marker does not say format \"shoal\"".into(),
        });
    }
    let version = value
        .get("version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| RootError::UnknownFormat {
            path: path.clone(),
            detail: "marker has no version".into(),
        })?;
    if version > u64::from(FORMAT_VERSION) {
        return Err(RootError::NewerFormat {
            path,
            found: version.min(u64::from(u32::MAX)) as u32,
        });
    }
    let config: RootConfig =
        serde_json::from_value(value).map_err(|e| RootError::UnknownFormat {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    if config.shards == 0 || config.shards > MAX_SHARDS {
        return Err(RootError::UnknownFormat {
            path,
            detail: format!("shards must be 1..={MAX_SHARDS}, found {}", config.shards),
        });
    }
    Ok(Marker::Found(config))
}

/// Write the marker under a temporary name and hard-link it into place, so that of two racing
/// creators exactly one marker wins and readers never see a half-written one.
fn write_marker(layout: &Layout, kind: LayoutKind) -> Result<RootConfig, RootError> {
    let config = RootConfig::new(kind);
    let tmp = layout.marker_tmp(crate::sys::random_u64());
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    crate::sys::set_mode(&f, 0o600).map_err(io_at(&tmp))?;
    let mut text = serde_json::to_string(&config).unwrap_or_default();
    text.push('\n');
    f.write_all(text.as_bytes()).map_err(io_at(&tmp))?;
    drop(f);
    let linked = fs::hard_link(&tmp, layout.marker());
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(config),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match read_marker(layout)? {
            Marker::Found(c) => Ok(c),
            _ => Err(RootError::Missing(layout.root().to_owned())),
        },
        Err(e) => Err(io_at(&layout.marker())(e)),
    }
}
