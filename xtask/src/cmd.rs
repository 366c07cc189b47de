//! Running commands: one context (workspace root, `$CARGO_HOME`, the `PATH` children see) and
//! helpers that either stream a child's output to the terminal or capture it.
//!
//! Guarantees:
//! - Every child runs in the workspace root with `$CARGO_HOME/bin` on its `PATH` (prepended when
//!   it was missing), so a `bpf-linker` installed by `setup` is the one the builds use.
//! - Every failure names the command (as a shell-like line, with the environment variables xtask
//!   set for it) and its exit status, or why it could not be started.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

/// What every command xtask runs shares.
pub struct Ctx {
    /// The workspace root (parent of the xtask package); children run here.
    pub root: PathBuf,
    /// `$CARGO_HOME`, or `~/.cargo` when unset.
    pub cargo_home: PathBuf,
    /// The `PATH` given to children: the user's, with `$CARGO_HOME/bin` prepended if missing.
    path: OsString,
    /// Whether `$CARGO_HOME/bin` was on the user's own `PATH`.
    pub cargo_bin_on_user_path: bool,
}

impl Ctx {
    pub fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| anyhow!("xtask's manifest dir has no parent"))?
            .to_path_buf();
        let cargo_home = match env::var_os("CARGO_HOME") {
            Some(home) if !home.is_empty() => PathBuf::from(home),
            _ => {
                let home = env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?;
                PathBuf::from(home).join(".cargo")
            }
        };
        let user_path = env::var_os("PATH").unwrap_or_default();
        let (path, cargo_bin_on_user_path) = child_path(&user_path, &cargo_home.join("bin"))?;
        Ok(Self {
            root,
            cargo_home,
            path,
            cargo_bin_on_user_path,
        })
    }

    /// A command for `program`, run in the workspace root with the children's `PATH`.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PATH", &self.path).current_dir(&self.root);
        cmd
    }

    /// The first executable file called `name` on the children's `PATH`.
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        env::split_paths(&self.path)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    }
}

/// The `PATH` for children and whether `cargo_bin` was already on `user_path`.
fn child_path(user_path: &OsStr, cargo_bin: &Path) -> Result<(OsString, bool)> {
    let dirs: Vec<PathBuf> = env::split_paths(user_path).collect();
    if dirs.iter().any(|d| d == cargo_bin) {
        return Ok((user_path.to_os_string(), true));
    }
    let joined = env::join_paths(std::iter::once(cargo_bin.to_path_buf()).chain(dirs))
        .with_context(|| format!("cannot put {} on PATH", cargo_bin.display()))?;
    Ok((joined, false))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether xtask runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A shell-like rendering of `cmd`: the variables xtask set (except `PATH`), program, arguments.
pub fn describe(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            let _ = write!(line, "{}={} ", key.to_string_lossy(), quote(value));
        }
    }
    line.push_str(&quote(cmd.get_program()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    line
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=+:,@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with the terminal as its stdin/stdout/stderr, after printing it; fails unless it
/// exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    println!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not run `{line}`"))?;
    if !status.success() {
        bail!("command `{line}` failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns what it did, whatever its exit status.
pub fn probe(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("could not run `{}`", describe(cmd)))
}

/// Runs `cmd` quietly and returns its stdout; fails (quoting its stderr) unless it exits with 0.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = probe(cmd)?;
    if !out.status.success() {
        bail!(
            "command `{}` failed: {}\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

/// `12.3s` below a minute, `4m05s` above.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// The `target_directory` cargo reports (honours `CARGO_TARGET_DIR` and `build.target-dir`).
pub fn target_dir(ctx: &Ctx) -> Result<PathBuf> {
    let json = capture(
        ctx.cmd("cargo")
            .args(["metadata", "--format-version", "1", "--no-deps"]),
    )?;
    let meta: serde_json::Value =
        serde_json::from_str(&json).context("cannot parse `cargo metadata` output")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("`cargo metadata` output has no target_directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_bin_is_prepended_only_when_missing() {
        let bin = Path::new("/home/u/.cargo/bin");
        let (path, present) = child_path(OsStr::new("/usr/bin:/bin"), bin).unwrap();
        assert!(!present);
        assert_eq!(path, "/home/u/.cargo/bin:/usr/bin:/bin");
        let (path, present) = child_path(OsStr::new("/usr/bin:/home/u/.cargo/bin"), bin).unwrap();
        assert!(present);
        assert_eq!(path, "/usr/bin:/home/u/.cargo/bin");
    }

    #[test]
    fn describe_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("cargo");
        cmd.env("PATH", "/x")
            .env("LLVM_PREFIX", "/p q")
            .args(["test", "--", "it's"]);
        assert_eq!(
            describe(&cmd),
            r"LLVM_PREFIX='/p q' cargo test -- 'it'\''s'"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_millis(1234)), "1.2s");
        assert_eq!(fmt_duration(Duration::from_secs(245)), "4m05s");
    }
}
