//! Gratuitous ARP and the VRRP virtual MAC.
