//! The host programs the agent runs, and the error a missing one gives: it names the
//! Debian package to install, because that is what the person reading the VM's condition
//! has to do (hack/programs.tsv holds the same table for the whole project).

use std::ffi::OsStr;
use std::process::Output;

/// A program the agent runs and the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const QEMU_IMG: Tool = Tool {
    program: "qemu-img",
    package: "qemu-utils",
};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{} is not installed on this node (install the Debian package {})", .0.program, .0.package)]
    Missing(Tool),
    #[error("cannot run {program}: {1}", program = .0.program)]
    Spawn(Tool, std::io::Error),
}

impl Tool {
    /// Runs the program to completion and returns what it printed.
    pub async fn output<I, S>(self, args: I) -> Result<Output, ToolError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        tokio::process::Command::new(self.program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| self.spawn_error(e))
    }

    /// As [`Self::output`], with the process's address space and CPU time capped: for
    /// parsing untrusted files (a crafted image can make `qemu-img info` allocate or
    /// spin without end: CVE-2015-5162; OpenStack caps it the same way, 1 GiB and 30 s).
    pub async fn output_limited<I, S>(
        self,
        args: I,
        address_space: u64,
        cpu_seconds: u64,
    ) -> Result<Output, ToolError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = tokio::process::Command::new(self.program);
        cmd.args(args).stdin(std::process::Stdio::null());
        // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe
        // and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                for (resource, value) in [
                    (libc::RLIMIT_AS, address_space),
                    (libc::RLIMIT_CPU, cpu_seconds),
                ] {
                    let lim = libc::rlimit {
                        rlim_cur: value as libc::rlim_t,
                        rlim_max: value as libc::rlim_t,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.output().await.map_err(|e| self.spawn_error(e))
    }

    pub fn spawn_error(self, e: std::io::Error) -> ToolError {
        if e.kind() == std::io::ErrorKind::NotFound {
            ToolError::Missing(self)
        } else {
            ToolError::Spawn(self, e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_program_names_its_package() {
        let tool = Tool {
            program: "vmlet-no-such-program",
            package: "vmlet-pkg",
        };
        let err = tool.output(["x"]).await.unwrap_err();
        assert!(matches!(err, ToolError::Missing(_)));
        assert_eq!(
            err.to_string(),
            "vmlet-no-such-program is not installed on this node (install the Debian package vmlet-pkg)"
        );
    }
}
