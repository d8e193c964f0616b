//! GPU figures from NVML (`libnvidia-ml.so.1`), for Triton's `nv_gpu_*` metrics.
//!
//! The library is opened at run time, once, the first time a scrape asks: a CPU machine has no
//! NVML, and then there are simply no GPU metrics (nothing is logged past one debug line, nothing
//! fails). Names and help texts of the metrics live in `telemetry::metrics`; this module only reads.
//!
//! The only `unsafe` of this module is in [`nvml`]: calls into the C library through function
//! pointers resolved by name, with the argument types of NVML's public header.
use std::sync::OnceLock;

/// One GPU's figures at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuStats {
    pub uuid: String,
    /// Fraction of the last sample period during which a kernel ran, 0.0 to 1.0 (as Triton).
    pub utilization: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// Watts.
    pub power_usage_watts: f64,
}

/// The NVML soname; the unversioned name is only in the driver's development package.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

static NVML: OnceLock<Option<nvml::Nvml>> = OnceLock::new();

/// Every visible GPU's figures; empty where NVML is absent or reports no device.
pub fn read_gpus() -> Vec<GpuStats> {
    NVML.get_or_init(|| open(NVML_LIBRARY))
        .as_ref()
        .map(nvml::Nvml::read_all)
        .unwrap_or_default()
}

/// Opens NVML from `library`; `None` (with a debug line) when it is missing or does not start.
pub fn open(library: &str) -> Option<nvml::Nvml> {
    match nvml::Nvml::open(library) {
        Ok(nvml) => Some(nvml),
        Err(reason) => {
            tracing::debug!(library, %reason, "no NVML: GPU metrics are not exported");
            None
        }
    }
}

#[allow(unsafe_code)] // FFI to NVML: the C library is loaded at run time; see the safety notes.
pub mod nvml {
    use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};

    use super::GpuStats;

    type Return = c_int;
    type Device = *mut c_void;
    const SUCCESS: Return = 0;
    const UUID_BUFFER: usize = 96;

    #[repr(C)]
    #[derive(Default)]
    struct Utilization {
        gpu: c_uint,
        memory: c_uint,
    }

    #[repr(C)]
    #[derive(Default)]
    struct Memory {
        total: c_ulonglong,
        free: c_ulonglong,
        used: c_ulonglong,
    }

    /// The NVML entry points the metrics need, resolved once. The `Library` is kept so the
    /// function pointers stay valid for as long as this value lives.
    pub struct Nvml {
        _library: libloading::Library,
        device_count: unsafe extern "C" fn(*mut c_uint) -> Return,
        device_by_index: unsafe extern "C" fn(c_uint, *mut Device) -> Return,
        uuid: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> Return,
        utilization: unsafe extern "C" fn(Device, *mut Utilization) -> Return,
        memory: unsafe extern "C" fn(Device, *mut Memory) -> Return,
        power: unsafe extern "C" fn(Device, *mut c_uint) -> Return,
    }

    // SAFETY: NVML is thread-safe (documented: all NVML calls may be made from any thread), and
    // the struct holds only the library handle and function pointers into it.
    unsafe impl Send for Nvml {}
    unsafe impl Sync for Nvml {}

    impl Nvml {
        pub fn open(path: &str) -> Result<Self, String> {
            // SAFETY: loading runs the library's initialisers; NVML's are the driver's own and
            // have no preconditions. Each symbol is given the signature of NVML's header (nvml.h,
            // the `_v2` entry points for those that have one).
            unsafe {
                let library = libloading::Library::new(path).map_err(|e| e.to_string())?;
                let init: unsafe extern "C" fn() -> Return =
                    *library.get(b"nvmlInit_v2\0").map_err(|e| e.to_string())?;
                let status = init();
                if status != SUCCESS {
                    return Err(format!("nvmlInit_v2 returned {status}"));
                }
                macro_rules! symbol {
                    ($name:literal) => {
                        *library.get($name).map_err(|e| e.to_string())?
                    };
                }
                Ok(Self {
                    device_count: symbol!(b"nvmlDeviceGetCount_v2\0"),
                    device_by_index: symbol!(b"nvmlDeviceGetHandleByIndex_v2\0"),
                    uuid: symbol!(b"nvmlDeviceGetUUID\0"),
                    utilization: symbol!(b"nvmlDeviceGetUtilizationRates\0"),
                    memory: symbol!(b"nvmlDeviceGetMemoryInfo\0"),
                    power: symbol!(b"nvmlDeviceGetPowerUsage\0"),
                    _library: library,
                })
            }
        }

        pub fn read_all(&self) -> Vec<GpuStats> {
            let mut count: c_uint = 0;
            // SAFETY: a valid out-pointer to a c_uint.
            if unsafe { (self.device_count)(&mut count) } != SUCCESS {
                return Vec::new();
            }
            (0..count).filter_map(|i| self.read_one(i)).collect()
        }

        /// One device's figures; `None` if NVML cannot describe it (lost, or no permission).
        fn read_one(&self, index: c_uint) -> Option<GpuStats> {
            let mut device: Device = std::ptr::null_mut();
            let mut uuid = [0 as c_char; UUID_BUFFER];
            let mut utilization = Utilization::default();
            let mut memory = Memory::default();
            let mut milliwatts: c_uint = 0;
            // SAFETY: every pointer is to a live local of the type nvml.h declares, the UUID
            // buffer's length is passed with it, and `device` comes from NVML itself.
            unsafe {
                if (self.device_by_index)(index, &mut device) != SUCCESS
                    || (self.uuid)(device, uuid.as_mut_ptr(), UUID_BUFFER as c_uint) != SUCCESS
                    || (self.memory)(device, &mut memory) != SUCCESS
                {
                    return None;
                }
                // Utilization and power are unsupported on some devices: report 0 then.
                let _ = (self.utilization)(device, &mut utilization);
                let _ = (self.power)(device, &mut milliwatts);
            }
            let bytes: Vec<u8> = uuid
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            Some(GpuStats {
                uuid: String::from_utf8_lossy(&bytes).into_owned(),
                utilization: f64::from(utilization.gpu) / 100.0,
                memory_used_bytes: memory.used,
                memory_total_bytes: memory.total,
                power_usage_watts: f64::from(milliwatts) / 1000.0,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_means_no_nvml_and_no_error() {
        assert!(open("libnvidia-ml-that-does-not-exist.so.1").is_none());
    }

    #[test]
    fn a_library_without_nvml_symbols_is_refused() {
        // libc is always there and has no nvmlInit_v2.
        assert!(open("libc.so.6").is_none());
    }

    #[test]
    fn reading_never_fails_whether_or_not_a_gpu_is_present() {
        let gpus = read_gpus();
        for gpu in &gpus {
            assert!(gpu.memory_total_bytes >= gpu.memory_used_bytes);
            assert!((0.0..=1.0).contains(&gpu.utilization));
        }
    }
}

#[cfg(test)]
mod render_tests {
    use super::GpuStats;
    use crate::telemetry::metrics::render_gpu_metrics;

    #[test]
    fn no_gpu_means_no_gpu_families() {
        assert_eq!(render_gpu_metrics(&[]), "");
    }

    #[test]
    fn each_gpu_is_one_sample_per_triton_family() {
        let gpu = |uuid: &str| GpuStats {
            uuid: uuid.to_string(),
            utilization: 0.25,
            memory_used_bytes: 1024,
            memory_total_bytes: 4096,
            power_usage_watts: 71.5,
        };
        let text = render_gpu_metrics(&[gpu("GPU-a"), gpu("GPU-b")]);
        for line in [
            "# TYPE nv_gpu_utilization gauge",
            "nv_gpu_utilization{gpu_uuid=\"GPU-a\"} 0.25",
            "nv_gpu_memory_total_bytes{gpu_uuid=\"GPU-b\"} 4096",
            "nv_gpu_memory_used_bytes{gpu_uuid=\"GPU-a\"} 1024",
            "nv_gpu_power_usage{gpu_uuid=\"GPU-b\"} 71.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
