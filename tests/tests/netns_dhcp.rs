//! The agent's DHCP client end to end, in network namespaces: the real
//! `shoal-agent dhcp --iface vethB` against a real dnsmasq over a veth pair,
//! then what the kernel ended up with (`ip addr`, `ip route`). Also the two
//! ways it must fail clearly: nobody answers, and no carrier.
//!
//! Needs root, iproute2, dnsmasq and `SHOAL_AGENT` (set by `cargo xtask test`).

use std::net::Ipv4Addr;
use std::time::Duration;

use shoal_tests::netns::{run_bounded, Bounded, Lab, CLIENT_IF};

fn prerequisites() {
    shoal_tests::require_root("netns_dhcp");
    shoal_tests::require_program("dnsmasq", "dnsmasq");
    shoal_tests::require_program("ip", "iproute2");
}

/// `shoal-agent dhcp --iface vethB --timeout <secs>` in the client namespace,
/// killed if it outlives `limit`.
fn agent_dhcp(lab: &Lab, timeout_secs: u32, limit: Duration) -> Bounded {
    let agent = shoal_tests::agent_bin();
    let mut cmd = lab.client.command(agent);
    cmd.args([
        "dhcp",
        "--iface",
        CLIENT_IF,
        "--timeout",
        &timeout_secs.to_string(),
    ]);
    cmd.env("RUST_LOG", "debug");
    run_bounded(&mut cmd, limit)
}

/// The address in `lease acquired on vethB (..): 10.77.x.y/24 router ...`.
fn leased_address(line: &str) -> (Ipv4Addr, u8) {
    let cidr = line
        .split_once("): ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let (addr, prefix) = cidr
        .split_once('/')
        .unwrap_or_else(|| panic!("no prefix in {cidr:?}"));
    (
        addr.parse().expect("leased address"),
        prefix.parse().expect("prefix length"),
    )
}

#[test]
fn lease_from_dnsmasq_is_given_to_the_kernel() {
    prerequisites();
    let mut lab = Lab::new(true);
    lab.start_dhcp(&[]);
    let out = agent_dhcp(&lab, 10, Duration::from_secs(30));
    let context = || {
        format!(
            "stdout:\n{}\nstderr:\n{}\ndnsmasq:\n{}",
            out.stdout,
            out.stderr,
            lab.dhcp_log()
        )
    };
    assert_eq!(out.code(), 0, "{}", context());

    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("lease acquired on "))
        .unwrap_or_else(|| panic!("{}", context()));
    assert!(
        line.starts_with(&format!("lease acquired on {CLIENT_IF} (")),
        "{line}"
    );
    let (addr, prefix) = leased_address(line);
    let octets = addr.octets();
    assert!(
        octets[..3] == [10, 77, lab.subnet] && (50..=99).contains(&octets[3]) && prefix == 24,
        "{addr}/{prefix} is not in the dnsmasq range; {}",
        context()
    );
    let router = lab.server_addr();
    assert!(line.contains(&format!(" router {router} ")), "{line}");
    assert!(line.contains(&format!(" server {router} ")), "{line}");
    assert!(line.contains(" lease 3600s "), "{line}");
    assert!(
        out.elapsed < Duration::from_secs(8),
        "took {:?}; {}",
        out.elapsed,
        context()
    );

    let addrs = lab.client.ip(&["-4", "addr", "show", CLIENT_IF]);
    assert!(
        addrs.contains(&format!("inet {addr}/24 ")),
        "ip addr:\n{addrs}"
    );
    let routes = lab.client.ip(&["-4", "route"]);
    assert!(
        routes.contains(&format!("default via {router} dev {CLIENT_IF}")),
        "ip route:\n{routes}"
    );
    assert!(
        lab.dhcp_log().contains(&format!(
            "DHCPACK({}) {addr}",
            shoal_tests::netns::SERVER_IF
        )),
        "{}",
        context()
    );
}

#[test]
fn no_dhcp_answer_fails_after_the_timeout() {
    prerequisites();
    let lab = Lab::new(true);
    let out = agent_dhcp(&lab, 3, Duration::from_secs(20));
    assert_eq!(
        out.code(),
        1,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("no DHCP answer on vethB after 3s"),
        "stderr:\n{}",
        out.stderr
    );
    assert!(out.stdout.trim().is_empty(), "stdout:\n{}", out.stdout);
    assert!(
        out.elapsed >= Duration::from_secs(3) && out.elapsed < Duration::from_secs(5),
        "took {:?}",
        out.elapsed
    );
    // Nothing was configured.
    let addrs = lab.client.ip(&["-4", "addr", "show", CLIENT_IF]);
    assert!(!addrs.contains("inet "), "ip addr:\n{addrs}");
}

#[test]
fn no_carrier_is_reported_as_such() {
    prerequisites();
    // The server end stays down: the client end comes up without carrier.
    let lab = Lab::new(false);
    let out = agent_dhcp(&lab, 10, Duration::from_secs(20));
    assert_eq!(
        out.code(),
        1,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("vethB: no carrier after 3s"),
        "stderr:\n{}",
        out.stderr
    );
    // It waited for carrier (3 s), not for DHCP (10 s).
    assert!(
        out.elapsed >= Duration::from_secs(3) && out.elapsed < Duration::from_secs(6),
        "took {:?}",
        out.elapsed
    );
}
