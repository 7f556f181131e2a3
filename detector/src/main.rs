use aya::programs::{Xdp, SchedClassifier, TestRun, TestRunOptions};
static OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector"));
fn main() {
    let mut bpf = aya::EbpfLoader::new().map_max_entries("FLOWS", 1024).load(OBJ).unwrap();
    for name in ["flow_ingress", "bench_pass", "bench_parse"] {
        let p: &mut Xdp = bpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap();
    }
    let p: &mut SchedClassifier = bpf.program_mut("flow_egress").unwrap().try_into().unwrap();
    p.load().unwrap();
    let p: &mut Xdp = bpf.program_mut("flow_ingress").unwrap().try_into().unwrap();
    let mut frame = vec![0u8; 64];
    frame[12]=8; frame[13]=0; frame[14]=0x45; frame[16]=0; frame[17]=40; frame[23]=17;
    let mut o = TestRunOptions::new(); o.data_in = Some(&frame); o.repeat=1;
    let r = p.test_run(o).unwrap();
    println!("{:?}", r);
}
