//! Process set-up for many connections: the open-file limit and the
//! descriptor table. A test binary of its own, since both are process-wide.

use rustix::process::{Resource, getrlimit};
use synapse_edge::process;

#[test]
fn the_open_file_limit_is_raised_to_its_ceiling_and_the_descriptor_table_reserved() {
    let prepared = process::prepare();
    let lim = getrlimit(Resource::Nofile);
    assert_eq!(
        lim.current, lim.maximum,
        "soft limit left below the hard one"
    );
    assert_eq!(Some(prepared.open_files), lim.current.or(Some(u64::MAX)));
    let want = prepared.open_files.min(65_536);
    assert!(
        prepared.reserved >= want,
        "descriptor table of {} for a limit of {}",
        prepared.reserved,
        prepared.open_files
    );
    // Opening thousands of connections' worth of descriptors never grows
    // the table again (each growth would stall the thread opening one).
    let n = 3_000.min(want.saturating_sub(64) as usize);
    let open: Vec<std::fs::File> = (0..n)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    assert_eq!(process::descriptor_table_size(), prepared.reserved);
    drop(open);
    assert_eq!(process::prepared(), Some(prepared));
}
