//! A console sink that notes when the guest first printed a marker, and
//! optionally passes everything through to stdout.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The marker the test and demo init scripts print first.
pub const INIT_MARKER: &[u8] = b"@@init";

/// Notes the [`Instant`] the guest first printed [`INIT_MARKER`].
#[derive(Clone, Default)]
pub struct MarkerClock {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    tail: Vec<u8>,
    seen: Option<Instant>,
    echo: bool,
    all: Vec<u8>,
}

impl MarkerClock {
    /// A clock that also copies the console to stdout.
    pub fn echoing() -> Self {
        let me = Self::default();
        me.state.lock().unwrap().echo = true;
        me
    }

    /// Everything the guest printed (kept only when echoing).
    pub fn text(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&st.all).into_owned()
    }

    /// When the marker first appeared.
    pub fn seen(&self) -> Option<Instant> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).seen
    }
}

impl Write for MarkerClock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.seen.is_none() {
            // Keep just enough of what came before to find a split marker.
            st.tail.extend_from_slice(buf);
            if st.tail.windows(INIT_MARKER.len()).any(|w| w == INIT_MARKER) {
                st.seen = Some(Instant::now());
            }
            let keep = st.tail.len().saturating_sub(INIT_MARKER.len() - 1);
            st.tail.drain(..keep);
        }
        if st.echo {
            st.all.extend_from_slice(buf);
            let mut out = std::io::stdout().lock();
            out.write_all(buf)?;
            out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}
