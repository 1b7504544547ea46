#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ril_fuzz::parquet_rows(data));
