//! Where this process's memory cgroups are: its cgroup2 directory and cgroup v1 memory
//! directory, from `/proc/self/cgroup` and `/proc/self/mountinfo`, and whether a group
//! has a memory limit (what `PressureSource::detect` chooses its source by).

use std::path::{Path, PathBuf};

/// Where this process's cgroups are, from `/proc/self/cgroup` and `/proc/self/mountinfo`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct CgroupPlaces {
    /// The process's cgroup2 directory, if a cgroup2 hierarchy is mounted.
    pub(crate) v2: Option<PathBuf>,
    /// Where the cgroup2 hierarchy is mounted.
    pub(crate) v2_mount: Option<PathBuf>,
    /// The process's cgroup v1 memory controller directory.
    pub(crate) v1_memory: Option<PathBuf>,
    /// Where the cgroup v1 memory controller is mounted (its root group, or the root of
    /// this namespace's view).
    pub(crate) v1_memory_mount: Option<PathBuf>,
}

/// Reads where this process's cgroups are. Allocates; for the caller's context.
pub(crate) fn cgroup_places() -> CgroupPlaces {
    let mut places = CgroupPlaces::default();
    let (Ok(cgroups), Ok(mounts)) = (
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return places;
    };
    // mountinfo: id parent major:minor root mount-point options... - fstype source super-options
    let mut v2_mount = None;
    let mut v1_mount = None;
    for line in mounts.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let (root, point) = (unescape(left[3]), unescape(left[4]));
        match right[0] {
            "cgroup2" if v2_mount.is_none() => v2_mount = Some((root, point)),
            "cgroup" if v1_mount.is_none() && right[2].split(',').any(|o| o == "memory") => {
                v1_mount = Some((root, point))
            }
            _ => {}
        }
    }
    // /proc/self/cgroup: hierarchy-id:controllers:path; cgroup2 is "0::path".
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            places.v2 = v2_mount
                .as_ref()
                .map(|(root, point)| under(point, root, path));
        } else if controllers.split(',').any(|c| c == "memory") {
            places.v1_memory = v1_mount
                .as_ref()
                .map(|(root, point)| under(point, root, path));
        }
    }
    places.v1_memory_mount = v1_mount.map(|(_, point)| PathBuf::from(point));
    places.v2_mount = v2_mount.map(|(_, point)| PathBuf::from(point));
    places
}

/// A cgroup v1 memory group's limit (`memory.limit_in_bytes`), `None` when unlimited or
/// unreadable.
pub(crate) fn v1_limit(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("memory.limit_in_bytes")).ok()?;
    let limit: u64 = text.trim().parse().ok()?;
    // "Unlimited" is PAGE_COUNTER_MAX pages, rounded: anything from 2^62 up.
    (limit < 1 << 62).then_some(limit)
}

/// Whether a cgroup2 group has a memory limit of its own (`memory.max` or `memory.high`
/// other than `max`).
pub(crate) fn v2_limited(dir: &Path) -> bool {
    ["memory.max", "memory.high"]
        .iter()
        .any(|file| std::fs::read_to_string(dir.join(file)).is_ok_and(|text| text.trim() != "max"))
}

/// The directory of cgroup `path` in a hierarchy mounted at `point` whose mount shows
/// group `root`.
fn under(point: &str, root: &str, path: &str) -> PathBuf {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let rel = rel.trim_start_matches('/');
    let mut dir = PathBuf::from(point);
    if !rel.is_empty() {
        dir.push(rel);
    }
    dir
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_a_mount() {
        assert_eq!(
            under("/sys/fs/cgroup", "/", "/a/b"),
            PathBuf::from("/sys/fs/cgroup/a/b")
        );
        assert_eq!(
            under("/sys/fs/cgroup", "/", "/"),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert_eq!(
            under("/sys/fs/cgroup", "/ns", "/ns/x"),
            PathBuf::from("/sys/fs/cgroup/x")
        );
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }
}
