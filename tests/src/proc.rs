//! Child processes for tests (the Controller, agents, dnsmasq): their output
//! gathered into a log that tests wait on with `expect(needle, timeout)`,
//! killed on drop.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    pos: usize,
}

fn pump(name: String, r: impl Read + Send + 'static, log: Arc<Mutex<String>>, echo: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if echo {
                eprintln!("[{name}] {line}");
            }
            let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
            l.push_str(&line);
            l.push('\n');
        }
    });
}

impl Proc {
    /// Starts `cmd` with stdout and stderr captured (and echoed to the test's
    /// stderr when `SHOAL_PROC_ECHO` is set).
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let echo = std::env::var_os("SHOAL_PROC_ECHO").is_some();
        pump(name.into(), child.stdout.take().unwrap(), log.clone(), echo);
        pump(name.into(), child.stderr.take().unwrap(), log.clone(), echo);
        Proc {
            name: name.into(),
            child,
            log,
            pos: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn saw(&self, needle: &str) -> bool {
        self.log().contains(needle)
    }

    /// Waits until `needle` appears after the read position; returns its
    /// line and moves the read position past it. Panics with the log tail.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        match self.try_expect(needle, timeout) {
            Some(line) => line,
            None => panic!(
                "[{}] {needle:?} did not appear within {timeout:?}; log:\n{}",
                self.name,
                tail(&self.log(), 4000)
            ),
        }
    }

    pub fn try_expect(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(i) = log.get(self.pos..).and_then(|s| s.find(needle)) {
                let at = self.pos + i;
                let start = log[..at].rfind('\n').map_or(0, |n| n + 1);
                let end = log[at..].find('\n').map_or(log.len(), |n| at + n);
                self.pos = end;
                return Some(log[start..end].to_owned());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counts lines containing `needle` in the whole log.
    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (through `kill(1)`; no libc here).
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
