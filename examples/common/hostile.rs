//! `guest_vsock hostile SECONDS SEED`: a guest program that attacks the
//! VMM's devices the way a fuzzer would, for the soak suite's hostile-guest
//! scenario (`examples/soak.rs`). It runs as root in a guest that loaded no
//! virtio driver, and drives the devices itself through `/dev/mem`:
//!
//! - random reads and writes, of every width, at random offsets of every
//!   MMIO slot from `0x1000_0000` (the devices' windows and the empty slots
//!   between them; a slot the guest kernel claimed, such as its console
//!   UART, is refused by `/dev/mem` and reported as such);
//! - per virtio device, one thread acting as a malicious driver: resets at
//!   random points, feature bits the device never offered, queue sizes and
//!   ring addresses that are out of range or unaligned, descriptor chains
//!   with random flags, lengths, `next` links (loops included) and indirect
//!   tables, avail indexes that jump, notifications of queues that do not
//!   exist, queue resets in the middle of requests;
//! - mixed in, well-formed traffic that floods each device: vsock
//!   connection requests to random host ports and data on connections that
//!   do not exist, network frames of random sizes (a packet storm),
//!   block requests of every type at random sectors.
//!
//! The program keeps the guest alive while it does so: every buffer it lets
//! a device write (rings, writable descriptors, indirect tables' writable
//! entries) lies inside one of its own locked pages, or at an address that
//! is not guest RAM, so a VMM that honours descriptors cannot corrupt the
//! guest kernel. At the end it resets every device and prints
//! `@@storm=done accesses=<n> requests=<n> resets=<n> devices=<id,id,...>
//! refused=<n>`.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const MMIO_START: u64 = 0x1000_0000;
const SLOT: u64 = 0x1000;
/// Slots tried: the devices dormouse places and empty ones after them.
const SLOTS: u64 = 24;
const RAM_START: u64 = 0x8000_0000;
const PAGE: u64 = 4096;
/// Pages each device thread owns: 3 rings for each of 3 queues, then data.
const PAGES: usize = 9 + 23;
const QUEUE_MAX: u32 = 256;
const VIRTIO_MAGIC: u32 = 0x7472_6976;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// A random index below `n`.
    fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn u32(&mut self) -> u32 {
        // Truncation is the point: the low 32 random bits.
        #[allow(clippy::cast_possible_truncation)]
        let v = self.next() as u32;
        v
    }
}

/// One device window, mapped from /dev/mem.
struct Window(*mut u8);

// SAFETY: the pointer is a device mapping that lives until the process
// ends; accesses are volatile MMIO, any thread may make them.
unsafe impl Send for Window {}

impl Window {
    fn read(&self, offset: u64, width: u64) -> u64 {
        let p = self
            .0
            .wrapping_add(usize::try_from(offset & (SLOT - 1)).unwrap_or(0));
        // SAFETY: `p` lies inside the 4 KiB device mapping (offset masked
        // to the slot) and is aligned to `width` by the callers' masks;
        // reading MMIO has no effect on this program's memory.
        unsafe {
            match width {
                1 => u64::from(std::ptr::read_volatile(p)),
                2 => u64::from(std::ptr::read_volatile(p.cast::<u16>())),
                4 => u64::from(std::ptr::read_volatile(p.cast::<u32>())),
                _ => std::ptr::read_volatile(p.cast::<u64>()),
            }
        }
    }

    #[allow(clippy::cast_possible_truncation)] // Each width keeps its low bytes.
    fn write(&self, offset: u64, width: u64, value: u64) {
        let p = self
            .0
            .wrapping_add(usize::try_from(offset & (SLOT - 1)).unwrap_or(0));
        // SAFETY: as in `read`; writing MMIO changes the device, never this
        // program's memory.
        unsafe {
            match width {
                1 => std::ptr::write_volatile(p, value as u8),
                2 => std::ptr::write_volatile(p.cast::<u16>(), value as u16),
                4 => std::ptr::write_volatile(p.cast::<u32>(), value as u32),
                _ => std::ptr::write_volatile(p.cast::<u64>(), value),
            }
        }
    }

    fn r32(&self, offset: u64) -> u32 {
        u32::try_from(self.read(offset, 4)).unwrap_or(0)
    }

    fn w32(&self, offset: u64, value: u32) {
        self.write(offset, 4, u64::from(value));
    }

    /// `n` accesses of random width at random (width-aligned) offsets.
    fn storm(&self, rng: &mut Rng, n: usize) {
        for _ in 0..n {
            let width = 1 << rng.below(4);
            let offset = rng.below(0x200) & !(width - 1);
            if rng.chance(50) {
                self.read(offset, width);
            } else {
                self.write(offset, width, rng.next());
            }
        }
    }
}

/// Locked pages of this process and their guest-physical addresses.
struct Pages {
    virt: *mut u8,
    phys: Vec<u64>,
}

// SAFETY: the mapping is owned by this struct and used by one thread.
unsafe impl Send for Pages {}

impl Pages {
    fn new(count: usize) -> io::Result<Self> {
        let len = count * 4096;
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let virt = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if virt == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let mut phys = Vec::with_capacity(count);
        for i in 0..count {
            use std::os::unix::fs::FileExt;
            let v = virt as u64 + i as u64 * PAGE;
            let mut entry = [0u8; 8];
            pagemap.read_exact_at(&mut entry, v / PAGE * 8)?;
            let entry = u64::from_le_bytes(entry);
            let pfn = entry & ((1 << 55) - 1);
            if entry >> 63 == 0 || pfn == 0 {
                return Err(io::Error::other("no physical address for a locked page"));
            }
            phys.push(pfn * PAGE);
        }
        Ok(Self {
            virt: virt.cast(),
            phys,
        })
    }

    fn page(&mut self, i: usize) -> &mut [u8] {
        // SAFETY: page i of the mapping this struct owns (i < count is
        // checked by the slice index in `phys` first); no other reference
        // to it lives while the returned one does.
        let _ = self.phys[i];
        // SAFETY: page i < count of the mapping this struct owns (the
        // index above panics otherwise); no other reference to it lives
        // while the returned one does.
        unsafe { std::slice::from_raw_parts_mut(self.virt.add(i * 4096), 4096) }
    }

    /// A buffer a device may write: inside one of our pages, or (now and
    /// then) at an address that is not guest RAM.
    fn writable(&mut self, rng: &mut Rng) -> (u64, u32) {
        if rng.chance(10) {
            let addr = if rng.chance(50) {
                rng.below(RAM_START)
            } else {
                (1 << 40) + rng.below(1 << 40)
            };
            return (addr, rng.u32() & 0xffff);
        }
        let page = 9 + rng.index(PAGES - 9);
        let offset = rng.below(PAGE);
        let len = 1 + rng.below(PAGE - offset);
        (self.phys[page] + offset, u32::try_from(len).unwrap_or(1))
    }

    /// A buffer a device only reads: anywhere at all.
    fn readable(&mut self, rng: &mut Rng) -> (u64, u32) {
        match rng.below(4) {
            0 => (rng.next(), rng.u32()),
            1 => (RAM_START + rng.below(128 << 20), rng.u32() & 0xffff),
            _ => self.writable(rng),
        }
    }
}

/// One descriptor table entry, safe for the guest: a writable one only
/// points where `Pages::writable` says.
fn descriptor(rng: &mut Rng, pages: &mut Pages, size: u16, indirect_page: Option<u64>) -> [u8; 16] {
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let mut flags = u16::try_from(rng.below(8)).unwrap_or(0);
    if rng.chance(10) {
        flags |= u16::try_from(rng.below(1 << 16)).unwrap_or(0) & !(WRITE | INDIRECT);
    }
    let (addr, len) = if flags & INDIRECT != 0 {
        match indirect_page {
            Some(p) if flags & WRITE == 0 => (p, 16 * (1 + rng.u32() % 32)),
            _ => {
                flags &= !INDIRECT;
                pages.writable(rng)
            }
        }
    } else if flags & WRITE != 0 {
        pages.writable(rng)
    } else {
        pages.readable(rng)
    };
    let next = if rng.chance(90) {
        u16::try_from(rng.below(u64::from(size.max(1)))).unwrap_or(0)
    } else {
        u16::try_from(rng.below(1 << 16)).unwrap_or(0)
    };
    desc(addr, len, flags, next)
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Counts of what one device thread did.
#[derive(Default)]
struct Counts {
    accesses: u64,
    requests: u64,
    resets: u64,
}

// virtio-mmio registers (version 2).
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_AVAIL: u64 = 0x090;
const QUEUE_USED: u64 = 0x0a0;
const QUEUE_RESET: u64 = 0x0c0;

struct Queue {
    size: u16,
    /// Ring pages are ours (else the rings point at non-RAM addresses and
    /// nothing is written into them).
    ours: bool,
    avail_idx: u16,
}

/// The malicious driver of one virtio device.
struct Driver {
    win: Window,
    id: u32,
    pages: Pages,
    rng: Rng,
    queues: Vec<Queue>,
    counts: Counts,
}

fn set_addr(win: &Window, reg: u64, addr: u64) {
    win.w32(reg, u32::try_from(addr & 0xffff_ffff).unwrap_or(0));
    win.w32(reg + 4, u32::try_from(addr >> 32).unwrap_or(0));
}

impl Driver {
    /// Resets and brings the device up with hostile choices.
    fn init(&mut self) {
        let rng = &mut self.rng;
        self.win.w32(STATUS, 0);
        self.counts.resets += 1;
        self.win.w32(STATUS, 1 | 2);
        for sel in 0..2 {
            self.win.w32(DEVICE_FEATURES_SEL, sel);
            let offered = self.win.r32(DEVICE_FEATURES);
            let want = if rng.chance(20) {
                rng.u32()
            } else {
                offered & (rng.u32() | 1)
            };
            self.win.w32(DRIVER_FEATURES_SEL, sel);
            // VIRTIO_F_VERSION_1 (bit 32) is needed to get anywhere, mostly.
            let want = if sel == 1 && rng.chance(90) {
                want | 1
            } else {
                want
            };
            self.win.w32(DRIVER_FEATURES, want);
        }
        self.win.w32(STATUS, 1 | 2 | 8);
        self.queues.clear();
        for q in 0..3u32 {
            self.win.w32(QUEUE_SEL, q);
            let max = self.win.r32(QUEUE_NUM_MAX);
            let size = match rng.below(10) {
                0 => rng.u32() & 0xffff,
                1 => max.saturating_add(1),
                _ => 1 << rng.below(9),
            };
            let size = u16::try_from(size.min(0xffff)).unwrap_or(0);
            let ours = size != 0 && u32::from(size) <= QUEUE_MAX.min(max) && rng.chance(90);
            self.win.w32(QUEUE_NUM, u32::from(size));
            let base = 3 * q as usize;
            let (d, a, u) = if ours {
                (
                    self.pages.phys[base],
                    self.pages.phys[base + 1],
                    self.pages.phys[base + 2] + 2 * rng.below(2),
                )
            } else {
                let bad = |rng: &mut Rng| {
                    if rng.chance(50) {
                        rng.below(RAM_START)
                    } else {
                        (1 << 40) + rng.below(1 << 40)
                    }
                };
                (bad(rng), bad(rng), bad(rng))
            };
            for i in 0..3 {
                self.pages.page(base + i).fill(0);
            }
            set_addr(&self.win, QUEUE_DESC, d);
            set_addr(&self.win, QUEUE_AVAIL, a);
            set_addr(&self.win, QUEUE_USED, u);
            self.win.w32(QUEUE_READY, u32::from(rng.chance(95)));
            self.queues.push(Queue {
                size,
                ours,
                avail_idx: 0,
            });
        }
        let status = if self.rng.chance(95) {
            1 | 2 | 4 | 8
        } else {
            self.rng.u32() & 0xff
        };
        self.win.w32(STATUS, status);
    }

    /// Writes a well-formed request of this device's kind at descriptors
    /// `head..`, returns how many it used (0: none for this queue).
    fn request(&mut self, q: usize, head: u16) -> u16 {
        let size = self.queues[q].size;
        let at = |i: u16| (head + i) % size;
        let data = 9 + self.rng.index(PAGES - 9);
        let data_phys = self.pages.phys[data];
        let rng = &mut self.rng;
        let mut table: Vec<(u16, [u8; 16])> = Vec::new();
        match (self.id, q) {
            // vsock tx: a connection request, data or a reset to a random
            // port of the host.
            (19, 1) => {
                let page = self.pages.page(data);
                let op = if rng.chance(70) {
                    1
                } else {
                    u16::try_from(rng.below(8)).unwrap_or(0)
                };
                let len = if op == 5 { rng.below(2048) } else { 0 };
                page[0..8].copy_from_slice(&3u64.to_le_bytes());
                page[8..16].copy_from_slice(&2u64.to_le_bytes());
                page[16..20].copy_from_slice(&rng.u32().to_le_bytes());
                page[20..24].copy_from_slice(&(rng.u32() % 2048).to_le_bytes());
                page[24..28].copy_from_slice(&u32::try_from(len).unwrap_or(0).to_le_bytes());
                page[28..30].copy_from_slice(&1u16.to_le_bytes());
                page[30..32].copy_from_slice(&op.to_le_bytes());
                page[36..40].copy_from_slice(&(64u32 << 10).to_le_bytes());
                let total = 44 + u32::try_from(len).unwrap_or(0);
                table.push((at(0), desc(data_phys, total, 0, 0)));
            }
            // net tx: a virtio-net header and a frame (a packet storm).
            (1, 1) => {
                let page = self.pages.page(data);
                page[..12].fill(0);
                let frame = 14 + rng.below(1500);
                for b in &mut page[12..12 + usize::try_from(frame).unwrap_or(14)] {
                    *b = u8::try_from(rng.below(256)).unwrap_or(0);
                }
                page[12..18].fill(0xff);
                let len = u32::try_from(12 + frame).unwrap_or(0);
                table.push((at(0), desc(data_phys, len, 0, 0)));
            }
            // block: a request of any type at a random sector.
            (2, 0) => {
                let types = [0u32, 1, 4, 8, 11, 13, rng.u32()];
                let kind = types[rng.index(types.len())];
                let sector = if rng.chance(80) {
                    rng.below(65536)
                } else {
                    rng.next()
                };
                let page = self.pages.page(data);
                page[0..4].copy_from_slice(&kind.to_le_bytes());
                page[8..16].copy_from_slice(&sector.to_le_bytes());
                if kind == 11 || kind == 13 {
                    page[16..24].copy_from_slice(&rng.below(1 << 20).to_le_bytes());
                    page[24..28].copy_from_slice(&rng.u32().to_le_bytes());
                }
                let (buf, len) = self.pages.writable(&mut self.rng);
                let write = if kind == 0 || kind == 8 { 2 } else { 0 };
                let (buf, len) = if write == 0 {
                    (data_phys + 16, 16 + (len & 0xe00))
                } else {
                    (buf, len)
                };
                let (status, _) = self.pages.writable(&mut self.rng);
                table.push((at(0), desc(data_phys, 16, 1, at(1))));
                table.push((at(1), desc(buf, len, 1 | write, at(2))));
                table.push((at(2), desc(status, 1, 2, 0)));
            }
            // Receive and event queues: writable buffers in our pages.
            (19 | 1, 0 | 2) => {
                let (addr, len) = self.pages.writable(&mut self.rng);
                table.push((at(0), desc(addr, len, 2, 0)));
            }
            _ => return 0,
        }
        let base = 3 * q;
        let used = u16::try_from(table.len()).unwrap_or(0);
        for (i, d) in table {
            let off = usize::from(i) * 16;
            self.pages.page(base)[off..off + 16].copy_from_slice(&d);
        }
        used
    }

    /// One burst of traffic on queue `q`: descriptors (well-formed or
    /// random), a jump of the avail index, a notification; sometimes a
    /// reset in the middle of it.
    fn burst(&mut self, q: usize) {
        let Queue { size, ours, .. } = self.queues[q];
        if ours && size > 0 {
            let base = 3 * q;
            let indirect = self.pages.phys[PAGES - 1];
            let mut heads = Vec::new();
            let mut head = 0u16;
            for _ in 0..1 + self.rng.below(16) {
                if self.rng.chance(70) {
                    let n = self.request(q, head);
                    if n > 0 {
                        heads.push(head);
                        head = (head + n) % size;
                        continue;
                    }
                }
                let i = u16::try_from(self.rng.below(u64::from(size))).unwrap_or(0);
                let d = descriptor(&mut self.rng, &mut self.pages, size, Some(indirect));
                let off = usize::from(i) * 16;
                self.pages.page(base)[off..off + 16].copy_from_slice(&d);
                heads.push(i);
            }
            // An indirect table of random (guest-safe) entries.
            for e in 0..256 {
                let d = descriptor(&mut self.rng, &mut self.pages, 32, None);
                self.pages.page(PAGES - 1)[e * 16..e * 16 + 16].copy_from_slice(&d);
            }
            let mut idx = self.queues[q].avail_idx;
            let avail = self.pages.page(base + 1);
            for h in &heads {
                let slot = 4 + 2 * usize::from(idx % size);
                avail[slot..slot + 2].copy_from_slice(&h.to_le_bytes());
                idx = idx.wrapping_add(1);
            }
            if self.rng.chance(5) {
                idx = idx.wrapping_add(u16::try_from(self.rng.below(1 << 16)).unwrap_or(0));
            }
            let flags = u16::try_from(self.rng.below(2)).unwrap_or(0);
            avail[0..2].copy_from_slice(&flags.to_le_bytes());
            avail[2..4].copy_from_slice(&idx.to_le_bytes());
            self.queues[q].avail_idx = idx;
            self.counts.requests += heads.len() as u64;
        }
        let which = if self.rng.chance(95) {
            u32::try_from(q).unwrap_or(0)
        } else {
            self.rng.u32()
        };
        self.win.w32(QUEUE_NOTIFY, which);
        let pending = self.win.r32(INTERRUPT_STATUS);
        self.win.w32(INTERRUPT_ACK, pending);
        self.counts.accesses += 3;
        match self.rng.below(100) {
            // A reset or a queue reset with the request in flight.
            0..=2 => self.init(),
            3..=4 => {
                self.win.w32(QUEUE_SEL, u32::try_from(q).unwrap_or(0));
                self.win.w32(QUEUE_RESET, 1);
                self.init();
            }
            5..=9 => {
                let n = 1 + self.rng.index(32);
                self.win.storm(&mut self.rng, n);
                self.counts.accesses += n as u64;
                if self.rng.chance(50) {
                    self.init();
                }
            }
            _ => {}
        }
    }

    fn run(mut self, until: Instant) -> Counts {
        self.init();
        while Instant::now() < until {
            let q = self.rng.index(3);
            self.burst(q);
        }
        // Leave no device writing into pages this process gives back.
        self.win.w32(STATUS, 0);
        self.counts
    }
}

/// Runs the storm for `seconds`, then resets every device.
pub fn run(seconds: u64, seed: u64) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")?;
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut windows = Vec::new();
    let mut refused = 0;
    for slot in 0..SLOTS {
        let addr = MMIO_START + slot * SLOT;
        // SAFETY: maps one page of device memory from /dev/mem; the kernel
        // refuses ranges it does not allow (RAM, claimed devices).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                usize::try_from(SLOT).unwrap_or(4096),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                libc::off_t::try_from(addr).unwrap_or(0),
            )
        };
        if p == libc::MAP_FAILED {
            refused += 1;
        } else {
            windows.push((slot, Window(p.cast())));
        }
    }
    let mut drivers = Vec::new();
    let mut others = Vec::new();
    let mut ids = Vec::new();
    let mut uart = None;
    for (i, (slot, win)) in windows.into_iter().enumerate() {
        if slot == 0 {
            // The console UART: its reads, and writes to its scratch
            // register. Anything else would garble the console this
            // program reports on (and the guest kernel's own driver).
            uart = Some(win);
        } else if win.r32(0) == VIRTIO_MAGIC {
            let id = win.r32(DEVICE_ID);
            ids.push(id);
            drivers.push(Driver {
                win,
                id,
                pages: Pages::new(PAGES)?,
                rng: Rng(seed.wrapping_mul(31).wrapping_add(i as u64) | 1),
                queues: Vec::new(),
                counts: Counts::default(),
            });
        } else {
            others.push(win);
        }
    }
    let threads: Vec<_> = drivers
        .into_iter()
        .map(|d| std::thread::spawn(move || d.run(until)))
        .collect();
    // This thread storms the windows that are not virtio devices.
    let mut rng = Rng(seed | 1);
    let mut total = Counts::default();
    while Instant::now() < until {
        if let Some(w) = others.get(rng.index(others.len())) {
            w.storm(&mut rng, 64);
            total.accesses += 64;
        }
        if let Some(u) = &uart {
            for offset in 0..8 {
                u.read(offset, 1);
            }
            u.write(7, 1, rng.next());
            total.accesses += 9;
        }
        if others.is_empty() && uart.is_none() {
            break;
        }
    }
    for t in threads {
        let c = t
            .join()
            .map_err(|_| io::Error::other("a device thread panicked"))?;
        total.accesses += c.accesses;
        total.requests += c.requests;
        total.resets += c.resets;
    }
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!(
        "@@storm=done accesses={} requests={} resets={} devices={} refused={refused}",
        total.accesses,
        total.requests,
        total.resets,
        ids.join(",")
    );
    Ok(())
}
