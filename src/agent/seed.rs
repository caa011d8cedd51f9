//! The cloud-init NoCloud seed: `meta-data`, `user-data` and `network-config` on an
//! ISO 9660 volume labelled `cidata`, written here rather than by an external tool.
//!
//! The image has one root directory, a primary volume descriptor (8.3 names) and a Joliet
//! supplementary descriptor (the real names, which Linux prefers). Dates are fixed, so the
//! same inputs always give the same bytes.

const SECTOR: usize = 2048;
const LABEL: &str = "cidata";

/// The files of a NoCloud seed.
pub fn nocloud_files(
    uid: &str,
    hostname: &str,
    user_data: Option<&str>,
    network_data: Option<&str>,
) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    // Through the YAML serialiser, which quotes whatever a scalar needs.
    let meta =
        std::collections::BTreeMap::from([("instance-id", uid), ("local-hostname", hostname)]);
    let meta = serde_saphyr::to_string(&meta).expect("a string map serialises");
    let user = user_data.unwrap_or("#cloud-config\n{}\n");
    // Without network-config cloud-init configures only the first NIC; DHCP on all instead.
    let net = network_data
        .unwrap_or("version: 2\nethernets:\n  all:\n    match: {name: \"e*\"}\n    dhcp4: true\n");
    vec![
        ("META_DAT.;1", "meta-data", meta.into_bytes()),
        ("NETWORK_.;1", "network-config", net.as_bytes().to_vec()),
        ("USER_DAT.;1", "user-data", user.as_bytes().to_vec()),
    ]
}

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|c| c.to_be_bytes()).collect()
}

/// A directory record: where an extent is, how long, and its identifier.
fn dir_record(lba: u32, len: u32, dir: bool, id: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(lba));
    r[10..18].copy_from_slice(&both32(len));
    r[18..25].copy_from_slice(&[70, 1, 1, 0, 0, 0, 0]); // 1970-01-01 00:00:00 UTC
    r[25] = if dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = id.len() as u8;
    r.extend_from_slice(id);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

fn text_field(buf: &mut [u8], s: &[u8], pad: &[u8]) {
    for chunk in buf.chunks_mut(pad.len()) {
        chunk.copy_from_slice(&pad[..chunk.len()]);
    }
    buf[..s.len()].copy_from_slice(s);
}

/// Writes an ISO 9660 + Joliet image holding `files` as (8.3 name, real name, contents).
pub fn iso9660(files: &[(&str, &str, Vec<u8>)]) -> Vec<u8> {
    // Sectors: 16 system, PVD, SVD, terminator, 4 path tables, 2 root directories, data.
    const PVD: usize = 16;
    const L_PT: u32 = 19;
    const M_PT: u32 = 20;
    const JL_PT: u32 = 21;
    const JM_PT: u32 = 22;
    const ROOT: u32 = 23;
    const JROOT: u32 = 24;
    let mut lba = 25u32;
    let mut extents = Vec::new();
    for (_, _, data) in files {
        extents.push(lba);
        lba += data.len().div_ceil(SECTOR).max(1) as u32;
    }
    let total = lba as usize;
    let mut img = vec![0u8; total * SECTOR];

    let root_dir = |joliet: bool| -> Vec<u8> {
        let me = if joliet { JROOT } else { ROOT };
        let mut d = dir_record(me, SECTOR as u32, true, &[0]);
        d.extend(dir_record(me, SECTOR as u32, true, &[1]));
        for ((short, long, data), &at) in files.iter().zip(&extents) {
            let id = if joliet {
                ucs2(long)
            } else {
                short.as_bytes().to_vec()
            };
            d.extend(dir_record(at, data.len() as u32, false, &id));
        }
        assert!(d.len() <= SECTOR, "seed directory fits one sector");
        d
    };

    for (joliet, desc, root, l_pt, m_pt) in [
        (false, PVD, ROOT, L_PT, M_PT),
        (true, PVD + 1, JROOT, JL_PT, JM_PT),
    ] {
        volume_descriptor(
            &mut img[desc * SECTOR..(desc + 1) * SECTOR],
            joliet,
            total as u32,
            root,
            (l_pt, m_pt),
        );
        // One path table entry each way: the root, its own parent.
        for (at, be) in [(l_pt, false), (m_pt, true)] {
            let e = &mut img[at as usize * SECTOR..];
            e[0] = 1;
            let loc = if be {
                root.to_be_bytes()
            } else {
                root.to_le_bytes()
            };
            e[2..6].copy_from_slice(&loc);
            e[6..8].copy_from_slice(&if be {
                1u16.to_be_bytes()
            } else {
                1u16.to_le_bytes()
            });
        }
        let dir = root_dir(joliet);
        img[root as usize * SECTOR..root as usize * SECTOR + dir.len()].copy_from_slice(&dir);
    }
    let term = &mut img[18 * SECTOR..19 * SECTOR];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    for ((_, _, data), &at) in files.iter().zip(&extents) {
        let start = at as usize * SECTOR;
        img[start..start + data.len()].copy_from_slice(data);
    }
    img
}

/// A primary (or, `joliet`, supplementary UCS-2) volume descriptor: the image's size in
/// sectors, its root directory's sector and the little- and big-endian path tables'.
fn volume_descriptor(s: &mut [u8], joliet: bool, total: u32, root: u32, (l_pt, m_pt): (u32, u32)) {
    s[0] = if joliet { 2 } else { 1 };
    s[1..6].copy_from_slice(b"CD001");
    s[6] = 1;
    let (pad, label) = if joliet {
        (&[0u8, 0x20][..], ucs2(LABEL))
    } else {
        (&b" "[..], LABEL.as_bytes().to_vec())
    };
    text_field(&mut s[8..40], &[], pad);
    text_field(&mut s[40..72], &label, pad);
    s[80..88].copy_from_slice(&both32(total));
    if joliet {
        s[88..91].copy_from_slice(b"%/E"); // UCS-2 level 3
    }
    s[120..124].copy_from_slice(&both16(1));
    s[124..128].copy_from_slice(&both16(1));
    s[128..132].copy_from_slice(&both16(SECTOR as u16));
    s[132..140].copy_from_slice(&both32(10));
    s[140..144].copy_from_slice(&l_pt.to_le_bytes());
    s[148..152].copy_from_slice(&m_pt.to_be_bytes());
    s[156..190].copy_from_slice(&dir_record(root, SECTOR as u32, true, &[0]));
    for range in [
        190..318,
        318..446,
        446..574,
        574..702,
        702..739,
        739..776,
        776..813,
    ] {
        text_field(&mut s[range], &[], pad);
    }
    for at in [813, 830, 847, 864] {
        s[at..at + 16].fill(b'0');
    }
    s[881] = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sector_aligned() {
        let files = nocloud_files("u-1", "vm", Some("#cloud-config\n"), None);
        let a = iso9660(&files);
        assert_eq!(a, iso9660(&files));
        assert_eq!(a.len() % SECTOR, 0);
        assert_eq!(&a[16 * SECTOR + 1..16 * SECTOR + 6], b"CD001");
        assert_eq!(&a[16 * SECTOR + 40..16 * SECTOR + 46], b"cidata");
    }

    #[test]
    fn meta_data_names_the_instance() {
        let files = nocloud_files("1234", "web", None, None);
        let meta = String::from_utf8(files[0].2.clone()).unwrap();
        assert!(
            meta.contains("instance-id: '1234'") || meta.contains("instance-id: \"1234\""),
            "{meta}"
        );
        assert!(meta.contains("local-hostname: web"));
    }

    /// isoinfo (genisoimage) reads the image back through its Joliet names.
    #[test]
    fn isoinfo_reads_files_back() {
        if std::process::Command::new("isoinfo")
            .arg("-version")
            .output()
            .is_err()
        {
            panic!("isoinfo is missing: run hack/deps.sh (package genisoimage)");
        }
        let user = "#cloud-config\nruncmd: [\"echo <&'\\\"> ok\"]\n".repeat(200);
        let files = nocloud_files("uid-9", "h", Some(&user), Some("version: 2\n"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        std::fs::write(&path, iso9660(&files)).unwrap();
        let read = |name: &str| {
            let out = std::process::Command::new("isoinfo")
                .args(["-J", "-i"])
                .arg(&path)
                .args(["-x", name])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        assert_eq!(read("/user-data"), user);
        assert_eq!(read("/network-config"), "version: 2\n");
        assert!(read("/meta-data").contains("uid-9"));
        let out = std::process::Command::new("isoinfo")
            .args(["-d", "-i"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("Volume id: cidata"));
    }
}
