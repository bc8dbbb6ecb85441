"""Federation pieces shared by the coordinator (server/) and the site agent (client/)."""
