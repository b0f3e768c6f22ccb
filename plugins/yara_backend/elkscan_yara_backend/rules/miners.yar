/*
 * Linux coin miners: pool configuration files and miner binaries. Part of elkscan's default rules.
 */

rule Linux_Cryptominer_StratumConfig
{
    meta:
        description = "Coin-miner configuration: a stratum pool URL together with a miner option key"
        author = "elkscan"
    strings:
        $pool = /stratum\+(tcp|ssl|tls):\/\/[a-zA-Z0-9.\-]{1,253}:[0-9]{2,5}/
        $key1 = "\"donate-level\""
        $key2 = "\"randomx\""
        $key3 = "\"nicehash\""
        $key4 = "\"rig-id\""
        $key5 = "--donate-level"
        $key6 = "\"cpu-priority\""
    condition:
        filesize < 1MB and $pool and any of ($key*)
}

rule Linux_Cryptominer_MinerBinary
{
    meta:
        description = "ELF executable with the option strings and algorithms of XMRig-style miners"
        author = "elkscan"
    strings:
        $opt1 = "--donate-level" ascii
        $opt2 = "--cpu-priority" ascii
        $opt3 = "--nicehash" ascii
        $algo1 = "cryptonight" ascii nocase
        $algo2 = "randomx" ascii nocase
        $proto = "stratum+tcp://" ascii
    condition:
        uint32(0) == 0x464c457f and 2 of ($opt*) and 1 of ($algo*) and $proto
}
