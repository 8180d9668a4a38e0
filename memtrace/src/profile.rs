//! Exports of outstanding memory for other tools: a pprof heap profile (gzipped
//! `profile.proto`, as `go tool pprof` and pprof-compatible viewers read it) and a flame
//! graph (SVG, drawn by inferno).
use std::{
    collections::{BTreeMap, HashMap},
    io::{Read as _, Write as _},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use prost::Message as _;

use crate::report::Frame;

/// One stack of outstanding memory: frames innermost first (frames[0] = the allocator's caller).
#[derive(Clone, Debug)]
pub struct ProfileSample {
    pub frames: Vec<Frame>,
    /// Outstanding bytes.
    pub bytes: u64,
    /// Outstanding allocations.
    pub count: u64,
}

/// The messages of google/pprof's `proto/profile.proto` that memtrace writes, with the
/// same field numbers (and so the same wire format).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        /// `string_table[0]` must be "".
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

/// The string table of a profile: index 0 is "", each string once.
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut strings = Self {
            table: Vec::new(),
            index: HashMap::new(),
        };
        strings.intern("");
        strings
    }

    fn intern(&mut self, s: &str) -> i64 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(digits, 16).ok()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What the frames say about one module, to place its Mapping.
struct ModuleInfo {
    name: String,
    min_address: u64,
    max_address: u64,
    /// (address, file offset) of the lowest frame whose offset is known.
    reference: Option<(u64, u64)>,
    all_functions: bool,
    all_files: bool,
    all_lines: bool,
}

impl ModuleInfo {
    /// Shared libraries, the vDSO and unknown code: not the main binary.
    fn looks_like_library(&self) -> bool {
        let file = Path::new(&self.name)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.name.starts_with('[') || file.contains(".so")
    }

    fn mapping(&self, id: u64, strings: &mut Strings) -> proto::Mapping {
        // Locations must fall in [memory_start, memory_limit); the file offset of an
        // address is then `address - memory_start + file_offset`. Without any known
        // offset, the addresses stand for themselves.
        let (memory_start, file_offset) = match self.reference {
            Some((address, offset)) => (
                self.min_address,
                offset.saturating_sub(address - self.min_address),
            ),
            None => (0, 0),
        };
        proto::Mapping {
            id,
            memory_start,
            memory_limit: self.max_address.saturating_add(1),
            file_offset,
            filename: strings.intern(&self.name),
            build_id: 0,
            has_functions: self.all_functions,
            has_filenames: self.all_files,
            has_line_numbers: self.all_lines,
            has_inline_frames: false,
        }
    }
}

/// A gzipped pprof protobuf (profile.proto from google/pprof) of outstanding memory, with sample
/// types `inuse_objects`/`count` and `inuse_space`/`bytes` (in that order, default_sample_type = inuse_space),
/// one Location per distinct (module, address), one Function per distinct (name, file), one Mapping per module,
/// Lines with line numbers when known; time_nanos set; readable by `go tool pprof` and by pprof-compatible tools.
pub fn pprof_heap(samples: &[ProfileSample]) -> Vec<u8> {
    let profile = build_profile(samples);
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    encoder
        .write_all(&profile.encode_to_vec())
        .expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

fn build_profile(samples: &[ProfileSample]) -> proto::Profile {
    let mut strings = Strings::new();
    let sample_type = vec![
        proto::ValueType {
            r#type: strings.intern("inuse_objects"),
            unit: strings.intern("count"),
        },
        proto::ValueType {
            r#type: strings.intern("inuse_space"),
            unit: strings.intern("bytes"),
        },
    ];
    let default_sample_type = strings.intern("inuse_space");
    let period_type = proto::ValueType {
        r#type: strings.intern("space"),
        unit: strings.intern("bytes"),
    };
    let comment = vec![strings.intern("memtrace: outstanding (not yet freed) memory per stack")];

    // Modules first, in order of appearance, with the main binary moved to the front
    // (pprof takes mapping[0] as the main binary).
    let mut modules: Vec<ModuleInfo> = Vec::new();
    let mut module_index: HashMap<&str, usize> = HashMap::new();
    for frame in samples.iter().flat_map(|s| &s.frames) {
        let address = parse_hex(&frame.address).unwrap_or(0);
        let offset = frame.offset.as_deref().and_then(parse_hex);
        let i = *module_index.entry(&frame.module).or_insert_with(|| {
            modules.push(ModuleInfo {
                name: frame.module.clone(),
                min_address: address,
                max_address: address,
                reference: None,
                all_functions: true,
                all_files: true,
                all_lines: true,
            });
            modules.len() - 1
        });
        let m = &mut modules[i];
        m.min_address = m.min_address.min(address);
        m.max_address = m.max_address.max(address);
        if let Some(offset) = offset
            && m.reference.is_none_or(|(a, _)| address < a)
        {
            m.reference = Some((address, offset));
        }
        m.all_functions &= frame.function.is_some();
        m.all_files &= frame.file.is_some();
        m.all_lines &= frame.line.is_some();
    }
    if let Some(main) = modules.iter().position(|m| !m.looks_like_library()) {
        let main = modules.remove(main);
        modules.insert(0, main);
    }
    let mapping: Vec<proto::Mapping> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| m.mapping(i as u64 + 1, &mut strings))
        .collect();
    let mapping_ids: HashMap<&str, u64> = modules
        .iter()
        .zip(&mapping)
        .map(|(m, p)| (m.name.as_str(), p.id))
        .collect();

    let mut location = Vec::new();
    let mut location_ids: HashMap<(&str, &str), u64> = HashMap::new();
    let mut function = Vec::new();
    let mut function_ids: HashMap<(&str, &str), u64> = HashMap::new();
    let mut sample = Vec::with_capacity(samples.len());
    for s in samples {
        let mut location_id = Vec::with_capacity(s.frames.len());
        for frame in &s.frames {
            let key = (frame.module.as_str(), frame.address.as_str());
            let id = match location_ids.get(&key) {
                Some(id) => *id,
                None => {
                    let id = location.len() as u64 + 1;
                    let line = frame.function.as_deref().map(|name| {
                        let file = frame.file.as_deref().unwrap_or("");
                        let function_id = *function_ids.entry((name, file)).or_insert_with(|| {
                            let id = function.len() as u64 + 1;
                            let name = strings.intern(name);
                            function.push(proto::Function {
                                id,
                                name,
                                system_name: name,
                                filename: strings.intern(file),
                                start_line: 0,
                            });
                            id
                        });
                        proto::Line {
                            function_id,
                            line: frame.line.map(i64::from).unwrap_or(0),
                        }
                    });
                    location.push(proto::Location {
                        id,
                        mapping_id: mapping_ids[frame.module.as_str()],
                        address: parse_hex(&frame.address).unwrap_or(0),
                        line: line.into_iter().collect(),
                        is_folded: false,
                    });
                    location_ids.insert(key, id);
                    id
                }
            };
            location_id.push(id);
        }
        sample.push(proto::Sample {
            location_id,
            value: vec![to_i64(s.count), to_i64(s.bytes)],
            label: Vec::new(),
        });
    }

    let time_nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
        .unwrap_or(0);
    proto::Profile {
        sample_type,
        sample,
        mapping,
        location,
        function,
        string_table: strings.table,
        drop_frames: 0,
        keep_frames: 0,
        time_nanos,
        duration_nanos: 0,
        period_type: Some(period_type),
        period: 1,
        comment,
        default_sample_type,
    }
}

fn decode_profile(data: &[u8]) -> anyhow::Result<proto::Profile> {
    let raw;
    let bytes = if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .context("gunzip the profile")?;
        raw = out;
        &raw[..]
    } else {
        data
    };
    proto::Profile::decode(bytes).context("decode the pprof protobuf")
}

/// Parses what `pprof_heap` wrote (gunzip + decode) back into per-sample (frame function names innermost first, bytes, count),
/// for tests and for checking totals.
///
/// A location without function names reads as `module+0xoffset`, as [`Frame::site`] writes it.
pub fn parse_pprof(data: &[u8]) -> anyhow::Result<Vec<(Vec<String>, u64, u64)>> {
    let profile = decode_profile(data)?;
    let strings = &profile.string_table;
    if strings.first().map(String::as_str) != Some("") {
        bail!("string_table[0] is not empty");
    }
    let string = |i: i64| -> anyhow::Result<&str> {
        usize::try_from(i)
            .ok()
            .and_then(|i| strings.get(i))
            .map(String::as_str)
            .with_context(|| format!("string index {i} outside the table"))
    };
    let value_index = |name: &str| -> anyhow::Result<usize> {
        for (i, t) in profile.sample_type.iter().enumerate() {
            if string(t.r#type)? == name {
                return Ok(i);
            }
        }
        bail!("no sample type {name}")
    };
    let bytes_index = value_index("inuse_space")?;
    let count_index = value_index("inuse_objects")?;
    let functions: HashMap<u64, &proto::Function> =
        profile.function.iter().map(|f| (f.id, f)).collect();
    let mappings: HashMap<u64, &proto::Mapping> =
        profile.mapping.iter().map(|m| (m.id, m)).collect();
    let locations: HashMap<u64, &proto::Location> =
        profile.location.iter().map(|l| (l.id, l)).collect();

    let mut out = Vec::with_capacity(profile.sample.len());
    for sample in &profile.sample {
        let mut names = Vec::with_capacity(sample.location_id.len());
        for id in &sample.location_id {
            let location = locations
                .get(id)
                .with_context(|| format!("sample refers to missing location {id}"))?;
            if location.line.is_empty() {
                names.push(match mappings.get(&location.mapping_id) {
                    Some(m) => {
                        let offset = location
                            .address
                            .wrapping_sub(m.memory_start)
                            .wrapping_add(m.file_offset);
                        format!("{}+{offset:#x}", string(m.filename)?)
                    }
                    None => format!("{:#x}", location.address),
                });
            }
            for line in &location.line {
                let function = functions.get(&line.function_id).with_context(|| {
                    format!(
                        "location {id} refers to missing function {}",
                        line.function_id
                    )
                })?;
                names.push(string(function.name)?.to_owned());
            }
        }
        let value = |i: usize| -> anyhow::Result<u64> {
            let v = *sample
                .value
                .get(i)
                .context("sample with fewer values than sample types")?;
            u64::try_from(v).with_context(|| format!("negative sample value {v}"))
        };
        out.push((names, value(bytes_index)?, value(count_index)?));
    }
    Ok(out)
}

/// A frame's label in inferno's folded format (`outer;inner count`): no ';' (the frame
/// separator), no line breaks, and no ` 123` at the end (read as a second count).
fn folded_label(frame: &Frame) -> String {
    let site = frame.site();
    let mut label: String = site
        .trim()
        .chars()
        .map(|c| match c {
            ';' => ',',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    if let Some(space) = label.rfind(' ')
        && label[space + 1..]
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.')
    {
        label.replace_range(space..space + 1, "\u{a0}");
    }
    if label.is_empty() {
        label.push_str("[unknown]");
    }
    label
}

/// An inferno flame graph (SVG) of outstanding bytes: root at the bottom = outermost frames; each frame labelled by Frame::site();
/// title given; an empty input still yields a valid SVG saying there is no data (inferno errors on empty input: handle it).
pub fn flamegraph_svg(samples: &[ProfileSample], title: &str) -> anyhow::Result<Vec<u8>> {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    for sample in samples.iter().filter(|s| s.bytes > 0) {
        let stack = if sample.frames.is_empty() {
            "[no stack]".to_owned()
        } else {
            sample
                .frames
                .iter()
                .rev()
                .map(folded_label)
                .collect::<Vec<_>>()
                .join(";")
        };
        let total = stacks.entry(stack).or_default();
        *total = total.saturating_add(sample.bytes);
    }
    if stacks.is_empty() {
        return Ok(empty_svg(title));
    }
    let lines: Vec<String> = stacks
        .iter()
        .map(|(stack, bytes)| format!("{stack} {bytes}"))
        .collect();

    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = "bytes".to_owned();
    options.colors =
        inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Mem);
    // Colors from the names, so that the same input draws the same picture.
    options.hash = true;
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg)
        .context("draw the flame graph")?;
    Ok(svg)
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && !matches!(c, '\n' | '\t') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The SVG for a profile with nothing outstanding: the title and a line saying so.
fn empty_svg(title: &str) -> Vec<u8> {
    format!(
        concat!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n",
            "<svg version=\"1.1\" width=\"1200\" height=\"90\" viewBox=\"0 0 1200 90\" ",
            "xmlns=\"http://www.w3.org/2000/svg\">\n",
            "<rect x=\"0\" y=\"0\" width=\"1200\" height=\"90\" fill=\"#eef2ee\"/>\n",
            "<text x=\"600\" y=\"30\" text-anchor=\"middle\" font-family=\"Verdana\" ",
            "font-size=\"17\">{}</text>\n",
            "<text x=\"600\" y=\"62\" text-anchor=\"middle\" font-family=\"Verdana\" ",
            "font-size=\"12\">No data: no outstanding memory to show</text>\n",
            "</svg>\n"
        ),
        xml_escape(title)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn frame(function: Option<&str>, module: &str, address: u64, offset: u64) -> Frame {
        Frame {
            function: function.map(str::to_owned),
            module: module.to_owned(),
            file: function.map(|f| format!("/src/{f}.c")),
            line: function.map(|f| 10 + f.len() as u32),
            address: format!("{address:#x}"),
            offset: Some(format!("{offset:#x}")),
        }
    }

    /// Three stacks: two share `main`, one frame has no symbol.
    fn samples() -> Vec<ProfileSample> {
        let app = "/usr/bin/app";
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let main = frame(Some("main"), app, 0x5555_0000_1234, 0x1234);
        let start = frame(Some("__libc_start_main"), libc, 0x7f00_0002_9d90, 0x29d90);
        vec![
            ProfileSample {
                frames: vec![
                    frame(Some("make_cache"), app, 0x5555_0000_2000, 0x2000),
                    main.clone(),
                    start.clone(),
                ],
                bytes: 4096,
                count: 4,
            },
            ProfileSample {
                frames: vec![
                    frame(Some("parse_config"), app, 0x5555_0000_3000, 0x3000),
                    main.clone(),
                    start.clone(),
                ],
                bytes: 1024,
                count: 16,
            },
            ProfileSample {
                frames: vec![
                    frame(None, libc, 0x7f00_0009_a0b0, 0x9a0b0),
                    frame(Some("worker"), app, 0x5555_0000_4000, 0x4000),
                    main,
                    start,
                ],
                bytes: 2048,
                count: 1,
            },
        ]
    }

    fn names(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| f.function.clone().unwrap_or_else(|| f.site()))
            .collect()
    }

    #[test]
    fn pprof_round_trip() {
        let samples = samples();
        let data = pprof_heap(&samples);
        assert_eq!(&data[..2], &[0x1f, 0x8b], "gzip header");

        let parsed = parse_pprof(&data).unwrap();
        assert_eq!(parsed.len(), samples.len());
        for (s, (names_read, bytes, count)) in samples.iter().zip(&parsed) {
            assert_eq!(*names_read, names(&s.frames));
            assert_eq!(*bytes, s.bytes);
            assert_eq!(*count, s.count);
        }
        let total = |f: fn(&(Vec<String>, u64, u64)) -> u64| parsed.iter().map(f).sum::<u64>();
        assert_eq!(total(|s| s.1), 4096 + 1024 + 2048);
        assert_eq!(total(|s| s.2), 4 + 16 + 1);
        assert_eq!(
            parsed[2].0[0],
            "/usr/lib/x86_64-linux-gnu/libc.so.6+0x9a0b0"
        );
    }

    #[test]
    fn pprof_structure() {
        let samples = samples();
        let profile = decode_profile(&pprof_heap(&samples)).unwrap();
        let s = |i: i64| profile.string_table[i as usize].as_str();
        assert_eq!(profile.string_table[0], "");
        let types: Vec<(&str, &str)> = profile
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(
            types,
            [("inuse_objects", "count"), ("inuse_space", "bytes")]
        );
        assert_eq!(s(profile.default_sample_type), "inuse_space");
        assert!(profile.time_nanos > 0);

        // Ids: non-zero, unique, and everything referenced exists.
        let ids = |ids: Vec<u64>| -> HashSet<u64> {
            assert!(ids.iter().all(|id| *id != 0));
            let set: HashSet<u64> = ids.iter().copied().collect();
            assert_eq!(set.len(), ids.len(), "duplicate ids");
            set
        };
        let mappings = ids(profile.mapping.iter().map(|m| m.id).collect());
        let locations = ids(profile.location.iter().map(|l| l.id).collect());
        let functions = ids(profile.function.iter().map(|f| f.id).collect());
        for sample in &profile.sample {
            assert_eq!(sample.value.len(), 2);
            assert!(sample.location_id.iter().all(|id| locations.contains(id)));
        }
        for location in &profile.location {
            assert!(mappings.contains(&location.mapping_id));
            let mapping = profile
                .mapping
                .iter()
                .find(|m| m.id == location.mapping_id)
                .unwrap();
            assert!((mapping.memory_start..mapping.memory_limit).contains(&location.address));
            for line in &location.line {
                assert!(functions.contains(&line.function_id));
                assert!(line.line > 0);
            }
        }

        // One location per distinct address, one function per name, one mapping per
        // module with the main binary first.
        assert_eq!(profile.location.len(), 6);
        assert_eq!(profile.function.len(), 5);
        assert_eq!(profile.mapping.len(), 2);
        assert_eq!(s(profile.mapping[0].filename), "/usr/bin/app");
        assert!(profile.mapping[0].has_functions && profile.mapping[0].has_line_numbers);
        assert!(!profile.mapping[1].has_functions);
        // A location's file offset follows from its mapping.
        for frame in samples.iter().flat_map(|s| &s.frames) {
            let address = parse_hex(&frame.address).unwrap();
            let location = profile
                .location
                .iter()
                .find(|l| l.address == address)
                .unwrap();
            let m = &profile.mapping[location.mapping_id as usize - 1];
            assert_eq!(s(m.filename), frame.module);
            let offset = location.address - m.memory_start + m.file_offset;
            assert_eq!(Some(offset), frame.offset.as_deref().and_then(parse_hex));
        }
        let function_names: HashSet<&str> = profile.function.iter().map(|f| s(f.name)).collect();
        assert!(function_names.contains("main") && function_names.contains("worker"));
        // Leaf first.
        let leaf = profile.sample[0].location_id[0];
        let leaf = &profile.location[leaf as usize - 1];
        let function = &profile.function[leaf.line[0].function_id as usize - 1];
        assert_eq!(s(function.name), "make_cache");
        assert_eq!(s(function.filename), "/src/make_cache.c");
    }

    #[test]
    fn pprof_empty_and_unparsable() {
        let parsed = parse_pprof(&pprof_heap(&[])).unwrap();
        assert!(parsed.is_empty());
        assert!(parse_pprof(b"\x1f\x8bnot really gzip").is_err());
    }

    fn count(svg: &str, needle: &str) -> usize {
        svg.matches(needle).count()
    }

    #[test]
    fn flamegraph_has_title_labels_and_total() {
        let mut samples = samples();
        samples[1].frames[0].function = Some("Vec<u8>::push&grow; again".into());
        let svg = flamegraph_svg(&samples, "memtrace: app <1234>").unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.starts_with("<?xml") || svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("memtrace: app &lt;1234&gt;"));
        for sample in &samples {
            for frame in &sample.frames {
                let site = frame.site();
                if site.contains('&') {
                    continue;
                }
                assert!(svg.contains(&site), "{site} missing");
            }
        }
        // '&' and '<' escaped, ';' replaced.
        assert!(svg.contains("Vec&lt;u8&gt;::push&amp;grow, again (parse_config.c:22)"));
        assert!(count(&svg, "main (main.c:14)") >= 1);
        // The total: the root frame and the frames' container.
        assert!(svg.contains("all (7,168 bytes, 100%)"));
        assert!(svg.contains("total_samples=\"7168\""));
    }

    #[test]
    fn flamegraph_of_nothing() {
        for samples in [Vec::new(), {
            let mut s = samples();
            s.iter_mut().for_each(|s| s.bytes = 0);
            s
        }] {
            let svg =
                String::from_utf8(flamegraph_svg(&samples, "leaks & <more>").unwrap()).unwrap();
            assert!(svg.starts_with("<?xml"));
            assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
            assert!(svg.contains("leaks &amp; &lt;more&gt;"));
            assert!(svg.contains("No data"));
        }
    }

    #[test]
    fn folded_labels() {
        let mut f = frame(Some("a;b"), "/bin/x", 1, 1);
        f.file = None;
        assert_eq!(folded_label(&f), "a,b");
        f.function = Some("operator 2".into());
        assert_eq!(folded_label(&f), "operator\u{a0}2");
        f.function = Some("x\ny".into());
        assert_eq!(folded_label(&f), "x y");
    }
}
