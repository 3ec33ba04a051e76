//! `synwake doctor`: what the probe needs from this machine, and what works per interface.

pub fn doctor() -> DoctorReport {
    todo!()
}
pub struct DoctorReport;
pub struct DoctorCheck;
pub struct InterfaceReport;
