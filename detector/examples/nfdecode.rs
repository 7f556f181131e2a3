// Exploration helper: decode every capture given on the command line.
use detector::sources::netflow::capture::decode_capture;
use detector::sources::netflow::decode::{DecodeLimits, Decoder};
fn main() {
    for p in std::env::args().skip(1) {
        let mut d = Decoder::new(DecodeLimits::default(), vec![]);
        let mut n = 0;
        let mut pk = 0u64;
        let mut by = 0u64;
        let mut est = 0u64;
        let st = decode_capture(std::path::Path::new(&p), None, &mut d, |recs| {
            for r in recs {
                n += 1;
                pk += r.packets;
                by += r.bytes;
                est += r.est_packets();
            }
        });
        let name = std::path::Path::new(&p)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let ex: Vec<_> = d
            .exporters()
            .values()
            .map(|s| {
                format!(
                    "dg={} tpl={} opt={} rec={} err={:?} notpl={} gaps={} lost={} skip={} compiled={}/{} parser={}",
                    s.datagrams,
                    s.templates,
                    s.options_records,
                    s.records,
                    s.errors,
                    s.no_template,
                    s.sequence_gaps,
                    s.sequence_lost,
                    s.skipped_records,
                    s.fast_datagrams,
                    s.fast_records,
                    s.slow_records
                )
            })
            .collect();
        println!("pending {:?}", d.pending());
        println!(
            "{name}: {:?} records={n} pkts={pk} bytes={by} est_pkts={est} {:?}",
            st.map(|s| (s.frames, s.datagrams, s.skipped)),
            ex
        );
    }
}
